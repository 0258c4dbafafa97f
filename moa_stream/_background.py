"""Background responses (`background=True`): metered once, when their final status is first seen.

Creating one returns at once with status `queued`; its call is then held open, keyed by the
response's id. Whichever later request of the same client shows the response finished (a
`responses.retrieve`, a resumed stream, a `responses.cancel`) ends the call with the response's
usage and status, once. The registry is bounded: past `DEFAULT_PENDING` held calls, the oldest
ends as `closed_early` with its usage missing, and so do the ones still held when the client closes.
"""

from __future__ import annotations

from collections import OrderedDict
from types import ModuleType
from typing import Any

from ._events import CallStatus
from ._meter import Call
from ._responses_reader import ResponsesReader
from ._responses_wire import Response, add_response_body, finished, response_decoder
from ._sdk import for_module
from ._tee import TeeStream

DEFAULT_PENDING = 1_000
"""Background responses held open at once per client."""


class BackgroundResponses:
    """Held calls by response id, oldest first."""

    def __init__(self, limit: int = DEFAULT_PENDING) -> None:
        self._limit = limit
        self._held: OrderedDict[str, Call] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, call: Call) -> None:
        response_id = call.buffer.response_id
        if response_id is None:  # nothing could ever name it again
            release(call, "error", "a background response came back without an id")
            return
        self._held[response_id] = call
        while len(self._held) > self._limit:
            _, oldest = self._held.popitem(last=False)
            release(oldest, "closed_early", f"more than {self._limit} background responses were pending")

    def get(self, response_id: str) -> Call | None:
        return self._held.get(response_id)

    def finish(self, call: Call, status: CallStatus, error: str | None = None) -> None:
        """End a held call (its final status was seen)."""
        if call.buffer.response_id is not None:
            self._held.pop(call.buffer.response_id, None)
        release(call, status, error)


def release(call: Call, status: CallStatus, error: str | None = None) -> None:
    call.held = False
    call.end(status, error)


def response_id_of(path: str) -> str | None:
    """The id in `.../responses/{id}` or `.../responses/{id}/cancel`."""
    head, _, tail = path.rpartition("/responses/")
    if not head and not path.startswith("/responses/"):
        return None
    return tail.split("/")[0] or None


async def observe_background(engine: Any, http: ModuleType, inner: Any, request: Any) -> Any:
    """Pass a look at a response on; when it is a held background response, read the answer into
    its call, and end the call once the response is finished."""
    response_id = response_id_of(request.url.path)
    registry: BackgroundResponses = engine.background
    call = registry.get(response_id) if response_id is not None else None
    response = await inner.handle_async_request(request)
    if call is None or response.status_code >= 400:
        return response
    sse = response.headers.get("content-type", "").startswith("text/event-stream")
    reader = _Observer(call, registry)
    tee = for_module(TeeStream, http, "AsyncByteStream")(
        response.stream, call, reader, sse=sse, content_encoding=response.headers.get("content-encoding")
    )
    return http.Response(response.status_code, headers=response.headers, stream=tee, extensions=response.extensions)


class _Observer(ResponsesReader):
    """Reads a retrieved response or a resumed stream into the held call, and ends it when finished."""

    __slots__ = ("_registry",)

    def __init__(self, call: Call, registry: BackgroundResponses) -> None:
        super().__init__(call)
        self._registry = registry

    def event(self, block: bytes) -> bytes:
        out = super().event(block)
        if self.done and self._call.held:
            self._registry.finish(self._call, "error" if self._call.buffer.error else "completed")
        return out

    def body(self, body: bytes, http_status: int) -> None:
        call = self._call
        try:
            response: Response = response_decoder.decode(body)
        except Exception:
            return  # not a response: the caller's SDK says so; the call stays held
        if not call.held or not finished(response):
            return
        call.buffer.clear_output()  # the whole answer is in this body
        add_response_body(call.buffer, body)
        status: CallStatus = (
            "error" if call.buffer.error else "cancelled" if response.status == "cancelled" else "completed"
        )
        self._registry.finish(call, status)

    def end_status(self) -> tuple[CallStatus, str | None] | None:
        return None  # a look ends nothing by itself
