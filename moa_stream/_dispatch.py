"""Delivery of events to sinks, off the caller's event loop.

Events are handed over with a non-blocking `offer()` from whatever thread finalizes a call, and are
delivered by a daemon thread that runs its own event loop: a slow, blocking or raising sink never
touches the caller's loop, and the dispatcher survives the caller's loop ending (scripts that call
`asyncio.run` twice, one loop per test). Each sink has its own bounded buffer; when it is full the
event is dropped for that sink and counted, never waited for.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours)
import contextlib
import inspect
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._events import Event
from ._sink_thread import SinkThread

logger = logging.getLogger("moa_stream")

Sink = Callable[[Event], None] | Callable[[Event], Awaitable[None]]
"""A sink: any callable taking one event, sync (run on a thread of its own) or async.

A sink with an `event_types` tuple attribute gets only events of those types; one with a
`write_batch(events)` coroutine method gets them in batches instead of one by one."""

_MAX_BATCH = 256
_CLOSE_TIMEOUT = 2.0
"""How long a sink's own `aclose()` may take when the dispatcher stops."""

LINGER_S = 0.02
"""How long events may wait on the sink thread for the ones after them (`flush()` does not wait)."""

DEFAULT_SINK_BUFFER = 10_000
"""Events buffered per sink before new ones are dropped for it."""


class SinkStats(msgspec.Struct, frozen=True, kw_only=True):
    """Delivery counts of one sink."""

    name: str
    delivered: int
    """Events the sink returned from without raising."""
    failed: int
    """Events the sink raised on (logged once per sink, then counted)."""
    dropped: int
    """Events dropped because the sink's buffer was full."""


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """An internal message for one sink (see `Dispatcher.offer_to`), never an event for the others."""


Item = Event | Notice
"""What travels to a sink: an event, or a notice meant for it alone."""

AnySink = Callable[[Any], object]
"""A sink as the dispatcher holds it: user sinks take events, internal ones notices as well (the
`event_types` of a sink say what it is given)."""


class _Marker:
    """Travels through a sink's buffer behind the events before it: set once they are handled."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = anyio.Event()


class _SinkRunner:
    def __init__(self, sink: AnySink, name: str, buffer: int) -> None:
        self.sink = sink
        self.name = name
        self.is_async = inspect.iscoroutinefunction(sink) or inspect.iscoroutinefunction(type(sink).__call__)
        self.send: MemoryObjectSendStream[Item | _Marker]
        self.receive: MemoryObjectReceiveStream[Item | _Marker]
        self.send, self.receive = anyio.create_memory_object_stream(buffer)
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.accepted = 0
        self.capacity = buffer
        self.event_types: tuple[type[Item], ...] | None = getattr(sink, "event_types", None)
        self.thread: SinkThread | None = None
        if not self.is_async and getattr(sink, "write_batch", None) is None:
            self.thread = SinkThread(f"moa-stream-sink {name}", self._call_each)
        self.abandoned = False

    def takes(self, event: Item) -> bool:
        return self.event_types is None or isinstance(event, self.event_types)

    def offer(self, event: Item) -> None:
        if not self.takes(event):
            return
        if self.thread is not None and self.accepted - self.delivered - self.failed >= self.capacity:
            self.dropped += 1  # its thread holds a full buffer's worth already
            return
        try:
            self.send.send_nowait(event)
            self.accepted += 1
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.dropped += 1

    async def run(self) -> None:
        try:
            async with self.receive:
                async for first in self.receive:
                    # Take whatever else is already waiting: one thread hop or one batch write serves
                    # a burst of events (a turn ends with several at once).
                    batch = [first]
                    with contextlib.suppress(anyio.WouldBlock):
                        while len(batch) < _MAX_BATCH:
                            batch.append(self.receive.receive_nowait())
                    events = [item for item in batch if not isinstance(item, _Marker)]
                    if events:
                        await self._deliver(events)
                    for item in batch:
                        if isinstance(item, _Marker):
                            await self._reached(item)
        except anyio.get_cancelled_exc_class():
            # Abandoned at close after the drain timeout: what it still held is lost, and counted.
            self.abandoned = True
            left = self.accepted - self.delivered - self.failed
            if left:
                self.dropped += left
                logger.warning("moa_stream sink %s did not keep up; %d events dropped at close", self.name, left)
            raise
        finally:
            if self.thread is not None:
                self.thread.stop()
            await self._close_sink()

    async def _reached(self, marker: _Marker) -> None:
        """Set `marker` once every event before it was handled (a sync sink's thread; an async sink's flush)."""
        if self.thread is None:
            flush = getattr(self.sink, "flush", None)
            if inspect.iscoroutinefunction(flush):
                try:
                    await flush()
                except Exception:
                    logger.exception("moa_stream sink %s failed to flush", self.name)
            marker.done.set()
            return
        self.thread.signal(asyncio.get_running_loop(), marker.done.set)

    async def _close_sink(self) -> None:
        aclose = getattr(self.sink, "aclose", None)
        if aclose is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            try:
                await aclose()
            except Exception:
                logger.exception("moa_stream sink %s failed to close", self.name)

    async def _deliver(self, events: list[Item]) -> None:
        write_batch = getattr(self.sink, "write_batch", None)
        if write_batch is not None:
            try:
                await write_batch(events)
            except Exception:
                self._failed(len(events))
            else:
                self.delivered += len(events)
        elif self.is_async:
            for event in events:
                try:
                    await self.sink(event)  # type: ignore[misc]  # an async sink: its call is awaitable
                except Exception:
                    self._failed(1)
                else:
                    self.delivered += 1
        else:
            assert self.thread is not None
            self.thread.put(events)  # a sync sink that blocks keeps its own thread, not the dispatcher

    def _call_each(self, events: list[Item]) -> None:
        """A sync sink's batch, on its own thread; counts stop once the sink was abandoned at close."""
        for event in events:
            try:
                self.sink(event)
            except Exception:
                if self.abandoned:
                    return
                self._failed(1)
            else:
                if self.abandoned:
                    return
                self.delivered += 1

    def _failed(self, count: int) -> None:
        if self.failed == 0:
            logger.exception("moa_stream sink %s raised; its failures are now counted", self.name)
        self.failed += count

    def stats(self) -> SinkStats:
        return SinkStats(name=self.name, delivered=self.delivered, failed=self.failed, dropped=self.dropped)


class Dispatcher:
    """Fans events out to sinks on a background thread; started on the first sink, stopped by aclose."""

    def __init__(self, *, buffer: int = DEFAULT_SINK_BUFFER) -> None:
        if buffer < 1:
            raise ValueError(f"sink buffer must be at least 1, got {buffer}")
        self._buffer = buffer
        self._lock = threading.Lock()
        self._runners: list[_SinkRunner] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._inbox: collections.deque[Event] = collections.deque()  # appends and pops are thread-safe
        self._wake_pending = False
        self._lingering = False
        """The loop delivered a batch less than `LINGER_S` ago (the loop thread's own flag)."""
        self._warned_late = False

    # -- caller side (any thread) ---------------------------------------------------------------

    def add_sink(self, sink: AnySink, *, name: str | None = None, buffer: int | None = None) -> None:
        if not callable(sink):
            raise TypeError(f"a sink must be callable, got {type(sink).__name__}")
        if buffer is not None and buffer < 1:
            raise ValueError(f"sink buffer must be at least 1, got {buffer}")
        runner = _SinkRunner(sink, name or _sink_name(sink), buffer or self._buffer)
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot add a sink: the dispatcher is closed")
            self._runners.append(runner)
            loop = self._ensure_started()
        # Starting a task needs a task context, which a plain loop callback does not have.
        asyncio.run_coroutine_threadsafe(self._start_runner(runner), loop)

    def offer(self, event: Event) -> None:
        """Hand an event over without waiting; never raises. After close, the event is counted as
        dropped by every sink that would have taken it (see `stats()`)."""
        loop = self._loop
        if self._closed:
            self._dropped_late([event])
            return
        if loop is None:
            return
        self._inbox.append(event)
        # One wake-up per linger interval at most: the loop takes everything in the inbox when it runs.
        if not self._wake_pending:
            self._wake_pending = True
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop has stopped under us (interpreter exit)
                late = list(self._inbox)
                self._inbox.clear()
                self._dropped_late(late)

    def run_soon(self, work: Callable[[], object]) -> bool:
        """Run `work` on the dispatcher's thread, ahead of later flushes; False without a running one."""
        loop = self._loop
        if loop is None or self._closed:
            return False
        try:
            loop.call_soon_threadsafe(work)
        except RuntimeError:  # the loop has stopped under us
            return False
        return True

    def _dropped_late(self, events: list[Event]) -> None:
        for runner in list(self._runners):
            runner.dropped += sum(runner.takes(event) for event in events)
        if not self._warned_late:
            self._warned_late = True
            logger.warning("moa_stream: an event arrived after the client was closed; it is counted as dropped")

    def offer_to(self, name: str, item: Notice) -> None:
        """Hand a notice to the sink called `name` alone, without waiting."""
        loop = self._loop
        runner = next((r for r in self._runners if r.name == name), None)
        if loop is None or runner is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(runner.offer, item)
        except RuntimeError:  # the loop has stopped under us (interpreter exit)
            runner.dropped += 1

    def stats(self) -> list[SinkStats]:
        return [runner.stats() for runner in list(self._runners)]

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event offered so far was handled by every sink; False on timeout."""
        future = self._submit_flush(timeout)
        if future is None:
            return True
        return await anyio.to_thread.run_sync(future.result)

    def flush_blocking(self, timeout: float = 10.0) -> bool:
        future = self._submit_flush(timeout)
        return True if future is None else future.result()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Flush, then stop the thread. Idempotent; later events are counted as dropped."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_blocking, timeout)

    def _close_blocking(self, timeout: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread, stop = self._loop, self._thread, self._stop
        if loop is None or thread is None or stop is None:
            return
        try:
            drained = asyncio.run_coroutine_threadsafe(self._flush(timeout), loop).result()
            if not drained:
                # Sinks still busy after the drain timeout are cancelled, so that the thread ends.
                loop.call_soon_threadsafe(self._abandon)
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            return  # loop already gone
        thread.join(timeout + _CLOSE_TIMEOUT)

    def _submit_flush(self, timeout: float) -> Future[bool] | None:
        loop = self._loop
        if loop is None or self._closed:
            return None
        try:
            return asyncio.run_coroutine_threadsafe(self._flush(timeout), loop)
        except RuntimeError:
            return None

    # -- dispatcher thread ----------------------------------------------------------------------

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        ready = threading.Event()
        thread = threading.Thread(target=self._thread_main, args=(ready,), name="moa-stream-sinks", daemon=True)
        thread.start()
        ready.wait()
        assert self._loop is not None
        self._thread = thread
        _live.add(self)
        return self._loop

    def _thread_main(self, ready: threading.Event) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                ready.set()
                try:
                    await self._stop.wait()
                finally:  # a stop ends every runner's stream; an abandon (a cancel) closes them too
                    for runner in self._runners:
                        runner.send.close()

        anyio.run(main, backend="asyncio")

    async def _start_runner(self, runner: _SinkRunner) -> None:
        assert self._task_group is not None
        self._task_group.start_soon(runner.run, name=f"moa-stream sink {runner.name}")

    def _abandon(self) -> None:
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    def _wake(self) -> None:
        """Deliver what the inbox holds, then linger: what arrives meanwhile waits for the linger's end
        and goes with it, so one cross-thread wake-up and one batch per sink serve many turns."""
        if self._lingering:
            return  # the linger's end takes it
        self._fan_out()
        self._lingering = True
        assert self._loop is not None
        self._loop.call_later(LINGER_S, self._linger_end)

    def _linger_end(self) -> None:
        # Callers may wake the loop again from here on; an event offered before this line found a
        # wake-up pending and is in the inbox, so it is checked for after it.
        self._wake_pending = False
        self._lingering = False
        if self._inbox:
            self._wake_pending = True
            self._wake()

    def _fan_out(self) -> None:
        inbox = self._inbox
        while inbox:
            event = inbox.popleft()
            for runner in self._runners:
                runner.offer(event)

    async def _flush(self, timeout: float) -> bool:
        self._fan_out()  # whatever is still in the inbox goes ahead of the markers
        markers = []
        with anyio.move_on_after(timeout):
            for runner in list(self._runners):
                marker = _Marker()
                # A marker is never dropped: waiting for buffer room is what a flush is for.
                await runner.send.send(marker)
                markers.append(marker)
            for marker in markers:
                await marker.done.wait()
            return True
        return False


def _sink_name(sink: Any) -> str:
    name = getattr(sink, "__qualname__", None) or type(sink).__qualname__
    return str(name)


# Dispatchers still running at interpreter exit get a short chance to deliver what they hold.
_live: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


def _flush_at_exit() -> None:
    for dispatcher in list(_live):
        try:
            dispatcher._close_blocking(timeout=2.0)
        except Exception:  # never turn interpreter exit into a traceback
            logger.debug("moa_stream: flush at exit failed", exc_info=True)


# This must run before concurrent.futures stops its worker threads at exit (`to_thread`
# needs them), i.e. as a threading-atexit hook registered after concurrent.futures'
# own: those run in reverse order, before the plain `atexit` ones.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_flush_at_exit)
else:  # pragma: no cover - every CPython since 3.9 has it
    atexit.register(_flush_at_exit)
