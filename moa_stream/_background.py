"""Background responses (`background=True`): metered once, when their final status is first seen.

Creating one returns at once with status `queued`; its call is then held open, keyed by the
response's id. Whichever later request of the same client shows the response finished (a
`responses.retrieve`, a resumed stream, a `responses.cancel`) ends the call with the response's
usage and status, once. The registry is bounded: past `DEFAULT_PENDING` held calls, the oldest
ends as `closed_early` with its usage missing, and so do the ones still held when the client closes.

With a shared store, a look that lands on another process (another replica behind a load
balancer) is not lost: the process holding the call registered its id in the store, the other
one hands the finished response's body over through the store, and the holder ends the call with
it, so the call is still metered once, by the process that made it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ._events import CallStatus
from ._meter import Call
from ._responses_reader import ResponsesReader
from ._responses_wire import Response, add_response_body, finished, response_decoder
from ._sdk import for_module
from ._tee import TeeStream, decoded_body

DEFAULT_PENDING = 1_000
"""Background responses held open at once per client."""


class BackgroundResponses:
    """Held calls by response id, oldest first."""

    def __init__(self, limit: int = DEFAULT_PENDING) -> None:
        self._limit = limit
        self._held: OrderedDict[str, Call] = OrderedDict()
        self._lock = threading.Lock()  # a finish can come from the store's thread
        self.forget: Callable[[str], None] = lambda response_id: None
        """Told each response id whose call is no longer held (the store stops watching it)."""

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, call: Call) -> None:
        response_id = call.buffer.response_id
        if response_id is None:  # nothing could ever name it again
            release(call, "error", "a background response came back without an id")
            return
        with self._lock:
            self._held[response_id] = call
            evicted = []
            while len(self._held) > self._limit:
                evicted.append(self._held.popitem(last=False))
        for old_id, oldest in evicted:
            self.forget(old_id)
            release(oldest, "closed_early", f"more than {self._limit} background responses were pending")

    def get(self, response_id: str) -> Call | None:
        return self._held.get(response_id)

    def finish(self, call: Call, status: CallStatus, error: str | None = None) -> None:
        """End a held call (its final status was seen)."""
        response_id = call.buffer.response_id
        if response_id is not None:
            with self._lock:
                self._held.pop(response_id, None)
            self.forget(response_id)
        release(call, status, error)

    def finish_with(self, response_id: str, body: bytes) -> None:
        """End the held call of `response_id` with a finished response's body (seen by another
        process); nothing if it is not held any more."""
        call = self.get(response_id)
        if call is not None and call.held:
            finish_from_body(self, call, body)


def finish_from_body(registry: BackgroundResponses, call: Call, body: bytes) -> None:
    """End a held call with a response body, if it shows the response finished."""
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
    registry.finish(call, status)


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
    if call is None and response_id is not None and await engine.store.held_elsewhere(response_id):
        return await _hand_over(engine, http, response_id, await inner.handle_async_request(request))
    response = await inner.handle_async_request(request)
    if call is None or response.status_code >= 400:
        return response
    sse = response.headers.get("content-type", "").startswith("text/event-stream")
    reader = _Observer(call, registry)
    tee = for_module(TeeStream, http, "AsyncByteStream")(
        response.stream, call, reader, sse=sse, content_encoding=response.headers.get("content-encoding")
    )
    return http.Response(response.status_code, headers=response.headers, stream=tee, extensions=response.extensions)


async def _hand_over(engine: Any, http: ModuleType, response_id: str, response: Any) -> Any:
    """A look at a response another process holds: pass it on, and if it shows the response
    finished, hand its body to that process through the store (a stream is passed on as it is)."""
    encoding = response.headers.get("content-encoding")
    if response.status_code >= 400 or response.headers.get("content-type", "").startswith("text/event-stream"):
        return response
    try:
        raw = b"".join([chunk async for chunk in response.stream])
    finally:
        await response.aclose()
    body = decoded_body(http, raw, encoding)
    try:
        done = finished(response_decoder.decode(body))
    except Exception:
        done = False
    if done:
        await engine.store.report_background(response_id, body)
    return http.Response(response.status_code, headers=response.headers, content=raw, extensions=response.extensions)


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
        finish_from_body(self._registry, self._call, body)

    def end_status(self) -> tuple[CallStatus, str | None] | None:
        return None  # a look ends nothing by itself
