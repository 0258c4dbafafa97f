"""The tee: forwards an upstream response body to the caller while recording it into a call.

It replaces the response's byte stream at the transport level, so the caller's SDK reads exactly the
bytes the bare SDK would read at its own pace: nothing is read ahead of the caller. What a body means
is its reader's business (`_chat_reader`, `_responses_reader`); the tee frames event streams, holds
whole bodies, and makes sure that whatever way the body ends, the call ends exactly once. Closing
never waits on the upstream.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any, Protocol

import anyio

from ._events import CallStatus
from ._meter import Call
from ._sse import SSEFramer

_MAX_RECORDED_BODY = 32 * 1024 * 1024
# After the last token, the usage (chat's usage chunk, the Responses terminal event) is normally
# already on the wire: when a caller stops at the end of the answer and closes, the engine reads the
# tail for at most this long, off the caller's path, before the call ends.
_USAGE_TAIL_S = 0.25


class Reader(Protocol):
    """What a body means for a call, by API (see `_chat_reader.ChatReader`)."""

    done: bool
    """The upstream said the answer is whole."""

    @property
    def holds_body(self) -> bool: ...

    def event(self, block: bytes) -> bytes:
        """Record one SSE block (never raising); what the caller gets of it."""

    def ended(self) -> None:
        """The event stream ended by itself."""

    def answered(self) -> bool:
        """The model finished its answer (its usage may still follow)."""

    def body(self, body: bytes, http_status: int) -> None:
        """Record a whole (decoded) body."""

    def rewrite_body(self, body: bytes) -> bytes:
        """A held body as the caller gets it."""

    def end_status(self) -> tuple[CallStatus, str | None] | None:
        """How the call ends once its body ended by itself (None: it stays open)."""


class TeeStream:
    """The response body the caller's SDK reads; made a byte stream of the client's HTTP module by
    `_sdk.for_module`."""

    _http: ModuleType

    def __init__(self, inner: Any, call: Call, reader: Reader, *, sse: bool, content_encoding: str | None) -> None:
        self._inner = inner
        self._iterator: AsyncIterator[bytes] | None = None
        self._call = call
        self._reader = reader
        self._sse = sse
        self._content_encoding = content_encoding
        self._framer = SSEFramer()
        self._body: list[bytes] = []
        self._body_size = 0
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
                elif self._reader.holds_body and not self._sse:
                    yield self._reader.rewrite_body(b"".join(self._body))
                return
            except BaseException as exc:
                self._call.end(*self._call.interrupted(exc))
                raise
            out = take(data)
            if out:
                yield out

    async def aclose(self) -> None:
        """Close without waiting on the upstream; the call ends here, or, when the stream stopped at
        the end of the answer before its usage, in a short tail read by a task the engine owns."""
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
        # that went wrong before the call ended. The collector may run this inside any metering code
        # of this thread (a turn's lock held), so the end is handed to the sink thread.
        call = self._call
        if not call.ended and not call.held:
            call.turn.owner.end_abandoned(call)

    # -- event streams ------------------------------------------------------------------------

    def _feed(self, data: bytes) -> bytes:
        """What the caller gets of `data`: its complete events, each as it came unless its reader
        strips or rewrites it; an unfinished event waits for the next read."""
        framer = self._framer
        if framer.idle and data.endswith(b"\n\n") and data.find(b"\n") == len(data) - 2 and b"\r" not in data:
            return self._reader.event(data)  # the usual case: one single-line event per read
        complete, blocks = framer.feed(data)
        if len(blocks) == 1:
            return self._reader.event(complete)
        changed = False
        kept: list[bytes] = []
        for block in blocks:
            out = self._reader.event(block)
            changed = changed or out is not block
            kept.append(out)
        return b"".join(kept) if changed else complete

    def _expects_usage_tail(self) -> bool:
        reader = self._reader
        return not reader.done and reader.answered() and self._call.buffer.usage is None

    async def _read_tail_then_end(self, status: CallStatus, error: str | None) -> None:
        """The engine's task: read what is left for the usage (briefly), then end the call with the
        status the caller's close decided, and close the upstream response."""
        try:
            iterator = self._iterator
            if iterator is not None:
                with anyio.move_on_after(_USAGE_TAIL_S):
                    while not self._reader.done and self._call.buffer.usage is None:
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
        """The body has ended: take a last event that lacks its empty line."""
        if self._framer.pending.strip():
            # A final event without its empty line: recorded, as some decoders still deliver it.
            self._reader.event(self._framer.pending + b"\n\n")
        self._reader.ended()

    # -- whole bodies (non-streamed responses and error responses) ------------------------------

    def _record_body(self, data: bytes) -> bytes:
        if self._reader.holds_body:
            self._body.append(data)  # held back: its usage is rewritten once the body is whole
            return b""
        if self._body_size < _MAX_RECORDED_BODY:
            self._body.append(data)
            self._body_size += len(data)
        return data

    def _at_end(self) -> None:
        call = self._call
        if call.ended:
            self._reader.done = True
            return
        if self._sse:
            self._finish_events()
        else:
            self._reader.body(self._decoded_body(), call.http_status or 0)
        ending = self._reader.end_status()
        if ending is None:
            call.hold()  # a background response, metered when its final status is seen
        else:
            call.end(*ending)

    def _decoded_body(self) -> bytes:
        return decoded_body(self._http, b"".join(self._body), self._content_encoding)

    def _status_on_close(self, exc: BaseException | None) -> tuple[CallStatus, str | None]:
        buffer = self._call.buffer
        if buffer.error and exc is not None and not isinstance(exc, GeneratorExit):
            return "error", buffer.error
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            return self._call.interrupted(exc)
        if self._reader.done or self._reader.answered():
            return "completed", None
        return "closed_early", None


def decoded_body(http: ModuleType, raw: bytes, content_encoding: str | None) -> bytes:
    """A whole body as its bytes were sent, decoded as the caller's client will (gzip, deflate,
    brotli), or as it is when it cannot be."""
    if not content_encoding or content_encoding == "identity":
        return raw
    try:
        # A throwaway response decodes exactly as the caller's client will.
        return bytes(http.Response(200, headers=[("content-encoding", content_encoding)], content=raw).read())
    except Exception:
        return raw
