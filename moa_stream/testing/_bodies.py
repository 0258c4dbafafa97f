"""What the simulator's answers are made of: JSON bodies, SSE streams with their mid-stream faults
(the same for chat completions and Responses, but for how a stream ends and what a fault sends),
and the count of bodies still open."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Final

import anyio
import msgspec

from .._errors import error_json
from ._chat import BROKEN_UTF8, DONE, INVALID_UTF8_EVENT, MALFORMED, MALFORMED_JSON, STREAM_ERROR
from ._models import _MID_STREAM_FAULTS, Fault, SimDisconnect, SimResponse, SimStats, SimTimeout
from ._responses_wire import broken_event, error_event

_json: Final = msgspec.json.Encoder()


@dataclasses.dataclass(frozen=True, slots=True)
class Framing:
    """How a stream ends and what its in-stream faults send (given the next sequence number)."""

    done: bytes
    error: Callable[[int], bytes]
    broken: Callable[[int], bytes]


CHAT: Final = Framing(DONE, lambda _: STREAM_ERROR, lambda _: INVALID_UTF8_EVENT)
# Responses streams end with their terminal event, no [DONE]; the broken delta follows the next event.
RESPONSES: Final = Framing(b"", error_event, lambda n: broken_event(n + 1))


class Bodies:
    """The response bodies the simulator sends (JSON documents, SSE streams and their mid-stream
    faults), and the count of bodies still open."""

    def __init__(self) -> None:
        self.stats = SimStats()
        self._idle: anyio.Event | None = None

    async def wait_idle(self) -> None:
        """Return once no response body is open; lets tests wait for cleanup without sleeping.

        Call it from the event loop that iterates the bodies (the event is not thread-safe).
        """
        while self.stats.open_streams:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def _whole(
        self, request_id: str, document: Any, delay: float, fault: Fault | None, read_timeout: float | None
    ) -> SimResponse:
        """A JSON body after `delay`. Without a stream, "after N chunks" has no meaning: a stall
        delays the whole reply, a disconnect drops it, malformed and invalid_utf8 garble it."""
        kind = fault.kind if fault is not None else None
        if fault is not None and kind == "stall":
            delay += fault.stall_s
        if delay > 0:
            await _wait(delay, read_timeout)
        garbled = None
        if kind == "malformed":
            garbled = MALFORMED_JSON
        elif kind == "invalid_utf8":
            garbled = _json.encode(document).replace(b'"id":"', b'"id":"' + BROKEN_UTF8, 1)
        return self._json(200, request_id, document, payload=garbled, drop=kind == "disconnect")

    def _sse(self, request_id: str, body: AsyncIterator[bytes]) -> SimResponse:
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache"), ("x-request-id", request_id)]
        return SimResponse(status=200, headers=headers, body=body)

    async def _stream(
        self,
        events: Iterator[tuple[bytes, float]],
        fault: Fault | None,
        read_timeout: float | None,
        framing: Framing,
    ) -> AsyncIterator[bytes]:
        if fault is not None and fault.kind not in _MID_STREAM_FAULTS:
            fault = None
        self._stream_opened()
        try:
            # The trailing None is the [DONE] slot (the end, for Responses), so a fault whose
            # `after_chunks` is past the last event still fires.
            for sent, (event, delay) in enumerate(itertools.chain(events, ((None, 0.0),))):
                if fault is not None and sent == fault.after_chunks:
                    kind, stall_s, fault = fault.kind, fault.stall_s, None
                    if kind == "disconnect":
                        raise SimDisconnect(f"simulated disconnect after {sent} chunks")
                    if kind == "stream_error":
                        yield framing.error(sent)
                        return
                    if kind == "invalid_utf8":  # several events in one read, the last one broken
                        yield (event or b"") + framing.broken(sent)
                        return
                    if kind == "malformed":
                        yield MALFORMED
                    else:
                        delay += stall_s
                if delay:
                    await _wait(delay, read_timeout)
                if event is None:
                    if framing.done:
                        yield framing.done
                    return
                yield event
        finally:
            self._stream_closed()

    async def _single(self, payload: bytes, *, drop: bool = False) -> AsyncIterator[bytes]:
        self._stream_opened()
        try:
            if drop:
                raise SimDisconnect("simulated disconnect before the body")
            yield payload
        finally:
            self._stream_closed()

    def _stream_opened(self) -> None:
        self.stats.open_streams += 1
        self.stats.max_open_streams = max(self.stats.max_open_streams, self.stats.open_streams)

    def _stream_closed(self) -> None:
        self.stats.open_streams -= 1
        if self.stats.open_streams == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    def _json(
        self,
        status: int,
        request_id: str,
        document: Any,
        extra: Iterable[tuple[str, str]] = (),
        *,
        payload: bytes | None = None,
        drop: bool = False,
    ) -> SimResponse:
        """A JSON response; `payload` replaces the encoded document (malformed fault), `drop`
        cuts the connection after the headers (disconnect fault)."""
        if payload is None:
            payload = _json.encode(document)
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            ("x-request-id", request_id),
            *extra,
        ]
        return SimResponse(status=status, headers=headers, body=self._single(payload, drop=drop))

    def _error(
        self,
        status: int,
        request_id: str,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        extra: Iterable[tuple[str, str]] = (),
    ) -> SimResponse:
        payload = error_json(status, message, type_=type_, param=param, code=code)
        return self._json(status, request_id, None, extra, payload=payload)


async def _wait(delay: float, read_timeout: float | None) -> None:
    if read_timeout is not None and delay > read_timeout:
        await anyio.sleep(read_timeout)
        raise SimTimeout(f"simulated read timeout: no data for {read_timeout} s")
    await anyio.sleep(delay)
