"""The tee: forwards an upstream response body to the caller while recording it into a call.

It replaces the response's byte stream at the transport level, so the caller's SDK reads exactly the
bytes the bare SDK would read (what we asked the upstream for on the caller's behalf is taken out
again) at its own pace: nothing is read ahead of the caller. Whatever way the body ends, the call
ends exactly once; closing never waits on the upstream.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

import anyio

from ._events import CallStatus
from ._meter import Call
from ._sse import SSEFramer, data_of
from ._wire import any_decoder, json_encoder

_MAX_RECORDED_BODY = 32 * 1024 * 1024
# After the last token, the usage chunk and [DONE] are normally already on the wire: when a caller
# stops at finish_reason and closes, the engine reads the tail for at most this long, off the
# caller's path, before the call ends.
_USAGE_TAIL_S = 0.25
# The `usage` key OpenAI adds to every chunk once usage is asked for, in the spellings servers use;
# the comma goes with it. A raw `"` cannot occur inside a JSON string, so these match keys only.
_NULL_USAGE = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')


UsageRewrite = Callable[[dict[str, Any]], dict[str, Any]]
"""Given the upstream's usage object, the usage object the caller should see."""

UsageLearner = Callable[[bool, bool], None]
"""Told, once a stream sent without a usage request has ended, whether a usage chunk came anyway
and whether chunks carried a `usage` key."""


def _with_usage(document: bytes, rewrite: UsageRewrite) -> bytes:
    payload = any_decoder.decode(document)
    if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
        payload["usage"] = rewrite(payload["usage"])
        return json_encoder.encode(payload)
    return document


def _without_null_usage(raw: bytes) -> bytes:
    for spelling in _NULL_USAGE:
        found = raw.find(spelling)
        if found >= 0:
            return raw[:found] + raw[found + len(spelling) :]
    return raw


class TeeStream:
    """The response body the caller's SDK reads; made a byte stream of the client's HTTP module by
    `_sdk.for_module`."""

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
        drop_null_usage: bool = False,
        learn_usage: UsageLearner | None = None,
    ) -> None:
        self._inner = inner
        self._iterator: AsyncIterator[bytes] | None = None
        self._call = call
        self._sse = sse
        self._strip_usage = strip_usage
        """Drop usage-only chunks: they came because we asked, and the caller did not."""
        self._drop_null_usage = drop_null_usage
        """Take the `usage: null` key out of chunks: it came because we asked."""
        self._content_encoding = content_encoding
        self._rewrite_usage = rewrite_usage
        self._learn_usage = learn_usage
        self._saw_usage_key = False
        self._framer = SSEFramer()
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
                if self._framer.pending:
                    yield self._framer.pending  # an event without its empty line: the SDK judges it
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
        """Close without waiting on the upstream; the call ends here, or, when the stream stopped at
        finish_reason before its usage chunk, in a short tail read by a task the engine owns."""
        if self._closed:
            return
        self._closed = True
        call = self._call
        if not call.ended:
            status, error = self._status_on_close(sys.exc_info()[1])
            if self._sse and self._expects_usage_tail():
                finish = functools.partial(call.end, status, error)
                if call.turn.owner.finish_later(self._read_tail_then_end(status, error), fallback=finish):
                    return
            call.end(status, error)
        with anyio.CancelScope(shield=True):
            await self._inner.aclose()

    def __del__(self) -> None:
        # The backstop: abandoned without being read or closed (the SDK never iterated), or a close
        # that went wrong before the call ended. `end` is synchronous and first-wins.
        if not self._call.ended:
            self._call.end("closed_early")

    # -- SSE ------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> bytes:
        """What the caller gets of `data`: its complete events, each as it came unless it is
        stripped or rewritten; an unfinished event waits for the next read."""
        complete, blocks = self._framer.feed(data)
        if len(blocks) == 1:  # the usual case: one event per read
            return self._block(complete)
        changed = False
        kept: list[bytes] = []
        for block in blocks:
            out = self._block(block)
            changed = changed or out is not block
            kept.append(out)
        return b"".join(kept) if changed else complete

    def _block(self, block: bytes) -> bytes:
        data = data_of(block)
        if data is None:  # comments, keep-alives
            return block
        if data.startswith(b"[DONE]"):
            self._saw_end()
            return block
        return self._event(data, block)

    def _event(self, data: bytes, raw: bytes) -> bytes:
        """Record one event's data; return what the caller gets of it (b"" when it is stripped).

        Whatever the event holds, this never raises: the caller's SDK judges the bytes it gets."""
        call = self._call
        buffer = call.buffer
        outputs = buffer.output_chunks
        try:
            chunk = buffer.add_chunk_json(data)
        except Exception as exc:  # a parser bug must not break the caller's stream: record it, pass the bytes on
            buffer.error = buffer.error or f"unreadable stream chunk: {type(exc).__name__}: {exc}"
            return raw
        if buffer.output_chunks != outputs and call.ttft_s is None:
            call.first_output()
        if self._learn_usage is not None and not self._saw_usage_key:
            self._saw_usage_key = b'"usage"' in data
        if chunk is None or chunk.usage is None:
            return _without_null_usage(raw) if self._drop_null_usage else raw
        if self._strip_usage and not chunk.choices:
            return b""
        if self._rewrite_usage is not None:
            return b"data: " + _with_usage(data, self._rewrite_usage) + b"\n\n"
        return raw

    def _expects_usage_tail(self) -> bool:
        buffer = self._call.buffer
        return not self._done and buffer.finish_reason is not None and buffer.usage is None

    async def _read_tail_then_end(self, status: CallStatus, error: str | None) -> None:
        """The engine's task: read what is left for the usage chunk (briefly), then end the call
        with the status the caller's close decided, and close the upstream response."""
        try:
            iterator = self._iterator
            if iterator is not None:
                with anyio.move_on_after(_USAGE_TAIL_S):
                    while not self._done and self._call.buffer.usage is None:
                        try:
                            data = await iterator.__anext__()
                        except StopAsyncIteration:
                            self._finish_events()
                            break
                        self._feed(data)
        except Exception:  # the tail is a bonus; the caller has what it asked for
            pass
        finally:
            self._call.end(status, error)
            with anyio.CancelScope(shield=True):
                await self._inner.aclose()

    def _finish_events(self) -> None:
        """The body has ended: take a last event that lacks its blank line."""
        if self._framer.pending.strip():
            # A final event without its empty line: recorded, as some decoders still deliver it.
            self._block(self._framer.pending + b"\n\n")
        self._saw_end()

    def _saw_end(self) -> None:
        """[DONE] or the end of the body: what a stream sent without a usage request showed about
        the upstream is now known."""
        self._done = True
        learn, self._learn_usage = self._learn_usage, None
        if learn is not None and self._call.buffer.finish_reason is not None:
            learn(self._call.buffer.usage is not None, self._saw_usage_key)

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
        call = self._call
        if call.ended:
            self._done = True
            return
        if self._sse:
            self._finish_events()
        else:
            self._done = True
            call.buffer.add_body(self._decoded_body(), http_status=call.http_status or 0)
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
