"""An event loop on a thread of its own, for a client bound to one loop (the Redis store's).

The callers' loops come and go (one per `asyncio.run`, one per test); a connection pool made on one
of them cannot be used from another. So the store's client lives here, and callers hand it
coroutines: awaited from any event loop, waited for from any thread, or left to run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio
import sniffio

T = TypeVar("T")


class LoopThread:
    """A daemon thread running one asyncio loop until `stop()`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `work` on the thread's loop; its future, from any thread."""
        return asyncio.run_coroutine_threadsafe(work, self.loop)

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work` (run on the thread's loop) from the caller's own event loop."""
        future = self.submit(work)
        try:
            library = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            library = "asyncio"
        if library == "asyncio":
            return await asyncio.wrap_future(future)
        return await anyio.to_thread.run_sync(future.result)

    def wait(self, work: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `work` and wait for it, from a thread that is not this one."""
        if threading.current_thread() is self._thread:
            work.close()
            raise RuntimeError("LoopThread.wait() called from its own thread")
        return self.submit(work).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
