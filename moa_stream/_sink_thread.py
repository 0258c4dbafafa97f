"""A thread of its own for one sync sink: the dispatcher hands it batches without waiting for them.

A sync sink may block (a webhook, a disk), so it never runs on the dispatcher's thread, where it would
hold up the other sinks. Handing a batch over is one queue put; nothing comes back per batch, so the
dispatcher's loop is not woken again when it is done (a flush marker is the exception: it is a
callable the thread runs when it reaches it). A sink that hangs keeps only this daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class SinkThread:
    """Runs `handle(batch)` for every batch put, in order, on a daemon thread started on first use."""

    def __init__(self, name: str, handle: Callable[[list[Any]], None]) -> None:
        self._name = name
        self._handle = handle
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, item: list[Any] | Callable[[], object]) -> None:
        """A batch to handle, or a callable to run once every batch before it was handled."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put(item)

    def signal(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        """Run `callback` on `loop` once every batch put before it was handled."""

        def reached() -> None:
            with contextlib.suppress(RuntimeError):  # the loop ended while the sink held this thread
                loop.call_soon_threadsafe(callback)

        self.put(reached)

    def stop(self) -> None:
        """End the thread after what it holds (a thread stuck in its sink stays, as a daemon)."""
        if self._thread is not None:
            self._queue.put(_STOP)

    def _main(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if callable(item):
                item()
            else:
                self._handle(item)  # type: ignore[arg-type]  # a batch: what put() was given
