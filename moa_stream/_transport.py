"""The metering transport: the one point that every SDK path crosses on its way upstream.

`create`, `with_raw_response`, `with_streaming_response`, `.stream()`, `with_options` copies and a
framework's direct `client.post(...)` all end in the HTTP client's transport, so that is where chat
calls are recognised, rewritten (usage requested, session header removed) and teed.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import anyio

from ._meter import Call, Engine
from ._session import SESSION_HEADER, current_session
from ._tee import tee_stream_class
from ._wire import any_decoder, json_encoder


def _is_chat(request: Any) -> bool:
    return bool(request.method == "POST" and request.url.path.endswith("/chat/completions"))


class MeteringTransport:
    """Base of the per-HTTP-library transports built by `metering_transport_class`."""

    _http: ModuleType

    def __init__(self, inner: Any, engine: Engine) -> None:
        self.inner = inner
        self.engine = engine
        self._closed = False

    async def handle_async_request(self, request: Any) -> Any:
        if _is_chat(request):
            return await self._chat(request)
        # The seam for more endpoints (Responses API): route here by path.
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Drain pending events and trace lines, then close the wrapped transport. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.engine.aclose()
            await self.inner.aclose()

    async def _chat(self, request: Any) -> Any:
        body = await request.aread()
        try:
            payload = any_decoder.decode(body)
        except Exception:
            payload = None
        if not isinstance(payload, dict):
            payload = {}  # not ours to judge: the upstream answers it, and the call is still metered
        session_id = current_session(request.headers.get(SESSION_HEADER))
        headers = request.headers.copy()
        headers.pop(SESSION_HEADER, None)
        model = str(payload.get("model", ""))
        streamed = payload.get("stream") is True
        messages = payload.get("messages")
        if not isinstance(messages, list):
            messages = []

        origin = f"{request.url.scheme}://{request.url.netloc.decode('ascii')}"
        options = payload.get("stream_options")
        asked_usage = isinstance(options, dict) and options.get("include_usage") is True
        inject = streamed and not asked_usage and origin not in self.engine.rejects_stream_options
        if streamed:
            # A compressed event stream could not be teed chunk by chunk.
            headers["accept-encoding"] = "identity"
        plain = self._request(request, headers, body)
        upstream = plain
        if inject:
            with_usage = {**payload, "stream_options": {**(options or {}), "include_usage": True}}
            upstream = self._request(request, headers, json_encoder.encode(with_usage))

        turn = self.engine.new_turn(session_id=session_id, model=model)
        call = turn.new_call(
            role="direct",
            label=model,
            provider=request.url.host,
            model=model,
            input_messages=messages,
            streamed=streamed,
            main=True,
        )
        turn.seal()
        response = await self._send(call, upstream)
        if inject and response.status_code == 400:
            raw = await _read_raw(response)
            if b"stream_options" not in raw:
                return self._teed(call, self._replay(response, raw), strip_usage=False)
            self.engine.rejects_stream_options.add(origin)
            inject = False
            response = await self._send(call, plain)
        return self._teed(call, response, strip_usage=inject)

    async def _send(self, call: Call, request: Any) -> Any:
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException as exc:
            call.end(*call.interrupted(exc))
            raise
        call.http_status = response.status_code
        call.request_id = response.headers.get("x-request-id")
        return response

    def _teed(self, call: Call, response: Any, *, strip_usage: bool) -> Any:
        content_type = response.headers.get("content-type", "")
        sse = response.status_code < 400 and content_type.startswith("text/event-stream")
        tee = tee_stream_class(self._http)(
            response.stream,
            call,
            sse=sse,
            strip_usage=strip_usage,
            content_encoding=response.headers.get("content-encoding"),
        )
        # A new response, since one built from bytes (mock transports) would bypass its stream.
        return self._http.Response(
            response.status_code, headers=response.headers, stream=tee, extensions=response.extensions
        )

    def _request(self, original: Any, headers: Any, body: bytes) -> Any:
        headers = headers.copy()
        headers.pop("content-length", None)
        headers.pop("transfer-encoding", None)
        return self._http.Request(
            original.method, original.url, headers=headers, content=body, extensions=original.extensions
        )

    def _replay(self, response: Any, raw: bytes) -> Any:
        return self._http.Response(
            response.status_code,
            headers=response.headers,
            stream=self._http.ByteStream(raw),
            extensions=response.extensions,
        )


async def _read_raw(response: Any) -> bytes:
    parts = [part async for part in response.stream]
    await response.stream.aclose()
    return b"".join(parts)


@functools.cache
def metering_transport_class(module: ModuleType) -> type[MeteringTransport]:
    """A MeteringTransport that is also `module.AsyncBaseTransport`."""
    namespace = {"__module__": __name__, "_http": module}
    return type("MeteringTransport", (MeteringTransport, module.AsyncBaseTransport), namespace)
