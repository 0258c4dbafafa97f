"""The tee: forwards an upstream response body to the caller while recording it into a call.

It replaces the response's byte stream at the transport level, so the caller's SDK reads exactly the
bytes the upstream sent (apart from a usage chunk we asked for on the caller's behalf) at its own
pace: nothing is read ahead of the caller. Whatever way the body ends, the call ends exactly once.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

import anyio

from ._events import CallStatus
from ._meter import Call
from ._wire import any_decoder, json_encoder

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_MAX_RECORDED_BODY = 32 * 1024 * 1024
# After the last token, the usage chunk and [DONE] are normally already on the wire: a caller who
# stops at finish_reason still gets them recorded if they arrive within this grace period.
_USAGE_TAIL_S = 0.25


UsageRewrite = Callable[[dict[str, Any]], dict[str, Any]]
"""Given the upstream's usage object, the usage object the caller should see."""


def _with_usage(document: bytes, rewrite: UsageRewrite) -> bytes:
    payload = any_decoder.decode(document)
    if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
        payload["usage"] = rewrite(payload["usage"])
        return json_encoder.encode(payload)
    return document


class TeeStream:
    """Base of the per-HTTP-library byte stream classes built by `tee_stream_class`."""

    _http: ModuleType

    def __init__(
        self,
        inner: Any,
        call: Call,
        *,
        sse: bool,
        strip_usage: bool,
        content_encoding: str | None,
        rewrite_usage: UsageRewrite | None = None,
    ) -> None:
        self._inner = inner
        self._iterator: AsyncIterator[bytes] | None = None
        self._call = call
        self._sse = sse
        self._strip_usage = strip_usage
        self._content_encoding = content_encoding
        self._rewrite_usage = rewrite_usage
        self._pending = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._done = False  # saw `[DONE]` or the end of the body
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        # An async generator: cheaper per chunk than a coroutine per `__anext__`. The inner iterator
        # is kept, so a second pass (the SDK draining after [DONE]) resumes where the first stopped.
        if self._iterator is None:
            self._iterator = self._inner.__aiter__()
        iterator = self._iterator
        take = self._feed if self._sse else self._record_body
        while True:
            try:
                data = await iterator.__anext__()
            except StopAsyncIteration:
                self._at_end()
                if self._pending:
                    tail, self._pending = self._pending, b""
                    yield tail
                elif self._rewrite_usage is not None and not self._sse:
                    yield _with_usage(b"".join(self._body), self._rewrite_usage)
                return
            except BaseException as exc:
                self._call.end(*self._call.interrupted(exc))
                raise
            out = take(data)
            if out:
                yield out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        call = self._call
        if not call.ended:
            exc = sys.exc_info()[1]
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            if not cancelled and self._sse and self._expects_usage_tail():
                await self._read_usage_tail()
            call.end(*self._status_on_close(exc))
        with anyio.CancelScope(shield=True):
            await self._inner.aclose()

    def __del__(self) -> None:
        # Abandoned without being read or closed (the SDK never started iterating): still account for it.
        if not self._closed and not self._call.ended:
            self._call.end("closed_early")

    # -- SSE ------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> bytes:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        # The hot path: servers flush one whole single-line `data:` event per write.
        if data.startswith(b"data: {") and data.find(b"\n") == len(data) - 2 and data.endswith(b"\n\n"):
            return self._one_event(data)
        if b"\r" in data:
            ends = [m.end() for m in _EVENT_END.finditer(data)]
            cut = ends[-1] if ends else -1
        else:
            found = data.rfind(b"\n\n")
            cut = found + 2 if found >= 0 else -1
        if cut < 0:
            self._pending = data
            return b""
        complete = data[:cut]
        self._pending = data[cut:]
        return self._parse_events(complete)

    def _one_event(self, event: bytes) -> bytes:
        return self._event(event[6:-2], event)

    def _event(self, data: bytes, raw: bytes) -> bytes:
        """Record one event's data; return what the caller gets of it (b"" when it is stripped)."""
        call = self._call
        buffer = call.buffer
        outputs = buffer.output_chunks
        chunk = buffer.add_chunk_json(data)
        if buffer.output_chunks != outputs and call.ttft_s is None:
            call.first_output()
        if chunk is None or chunk.usage is None:
            return raw
        if self._strip_usage and not chunk.choices:
            return b""
        if self._rewrite_usage is not None:
            return b"data: " + _with_usage(data, self._rewrite_usage) + b"\n\n"
        return raw

    def _parse_events(self, complete: bytes) -> bytes:
        changed = False
        kept: list[bytes] = []
        start = 0
        separators = _EVENT_END.finditer(complete) if b"\r" in complete else None
        while start < len(complete):
            if separators is None:
                found = complete.find(b"\n\n", start)
                if found < 0:  # stray newlines after the last event
                    kept.append(complete[start:])
                    break
                end, block = found + 2, complete[start:found]
            else:
                match = next(separators, None)
                if match is None:
                    kept.append(complete[start:])
                    break
                end, block = match.end(), complete[start : match.start()]
            raw = complete[start:end]
            start = end
            data = _sse_data(block)
            if data is None:
                kept.append(raw)
                continue
            if data.startswith(b"[DONE]"):
                self._done = True
                kept.append(raw)
                continue
            out = self._event(data, raw)
            changed = changed or out is not raw
            kept.append(out)
        return b"".join(kept) if changed else complete

    def _expects_usage_tail(self) -> bool:
        buffer = self._call.buffer
        return not self._done and buffer.finish_reason is not None and buffer.usage is None

    async def _read_usage_tail(self) -> None:
        iterator = self._iterator
        if iterator is None:
            return
        with anyio.move_on_after(_USAGE_TAIL_S):
            try:
                while not self._done and self._call.buffer.usage is None:
                    self._feed(await iterator.__anext__())
            except StopAsyncIteration:
                self._done = True
            except Exception:  # the tail is a bonus; the caller has what it asked for
                return

    # -- whole bodies (non-streamed completions and error responses) ----------------------------

    def _record_body(self, data: bytes) -> bytes:
        if self._rewrite_usage is not None:
            self._body.append(data)  # held back: its usage is rewritten once the body is whole
            return b""
        if self._body_size < _MAX_RECORDED_BODY:
            self._body.append(data)
            self._body_size += len(data)
        return data

    def _at_end(self) -> None:
        self._done = True
        call = self._call
        if call.ended:
            return
        if not self._sse:
            call.buffer.add_body(self._decoded_body(), http_status=call.http_status or 0)
        elif self._pending.strip():
            # A final event without its blank line: the SDK's decoder still delivers it.
            self._parse_events(self._pending + b"\n\n")
        status: CallStatus = "error" if call.buffer.error else "completed"
        call.end(status)

    def _decoded_body(self) -> bytes:
        raw = b"".join(self._body)
        if not self._content_encoding or self._content_encoding == "identity":
            return raw
        try:
            # A throwaway response decodes gzip/deflate/brotli exactly as the caller's client will.
            response = self._http.Response(200, headers=[("content-encoding", self._content_encoding)], content=raw)
            return bytes(response.read())
        except Exception:
            return raw

    def _status_on_close(self, exc: BaseException | None) -> tuple[CallStatus, str | None]:
        buffer = self._call.buffer
        if buffer.error and exc is not None and not isinstance(exc, GeneratorExit):
            return "error", buffer.error
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            return self._call.interrupted(exc)
        if self._done or buffer.finish_reason is not None:
            return "completed", None
        return "closed_early", None


def _sse_data(block: bytes) -> bytes | None:
    """The `data` of one SSE event, or None for an event without data (comments, keep-alives)."""
    if block.startswith(b"data: ") and b"\n" not in block and b"\r" not in block:
        return block[6:]
    parts = []
    for line in block.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


@functools.cache
def tee_stream_class(module: ModuleType) -> type[TeeStream]:
    """A TeeStream that is also `module.AsyncByteStream`, as the client requires of response streams."""
    namespace = {"__module__": __name__, "_http": module}
    return type("TeeStream", (TeeStream, module.AsyncByteStream), namespace)
