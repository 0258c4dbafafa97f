"""The Redis store's outbox: settlements, releases and turn counts, sent in order, in pipelined
batches, retried until the store takes them.

Each item is an idempotent script run (by call id, by turn id), so sending a batch again after a
lost answer changes nothing, and an outage delays the ledger without losing any of it. Between
batches, at least every `period()` seconds, the store's `tick()` runs (lease renewals, looks at
background responses handed over by other processes), also while the outbox is never empty.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("moa_stream")

Item = tuple[Any, list[str], list[Any], Callable[[Any], None] | None]
"""A registered script, its keys and arguments, and what to do with its result."""

_MAX_BATCH = 256


class Outbox:
    """Runs on the store's own event loop (`run()`); `post()` from any thread."""

    def __init__(
        self,
        redis: Any,
        *,
        loop: asyncio.AbstractEventLoop,
        where: str,
        timeout_s: float,
        before_send: Callable[[], Awaitable[None]],
        tick: Callable[[], Awaitable[None]],
        period: Callable[[], float],
    ) -> None:
        self._redis = redis
        self._loop = loop
        self._where = where
        self._timeout_s = timeout_s
        self._before_send = before_send
        self._tick = tick
        self._period = period
        self._items: collections.deque[Item] = collections.deque()
        self._wake = asyncio.Event()
        self._sending = False
        self.closing = False

    def __len__(self) -> int:
        return len(self._items)

    def post(self, item: Item) -> None:
        """Queue one script run (from any thread)."""
        try:
            self._loop.call_soon_threadsafe(self._append, item)
        except RuntimeError:  # the store's loop is closed: nothing can take it any more
            logger.error("moa_stream: the store at %s is closed; an update of %s was not sent", self._where, item[1][0])

    def _append(self, item: Item) -> None:
        self._items.append(item)
        self._wake.set()

    def close(self) -> None:
        """Send what is queued, then stop (`run()` returns)."""
        self.closing = True
        self._loop.call_soon_threadsafe(self._wake.set)

    async def drained(self, timeout: float) -> bool:
        """Wait (on the store's loop) until everything posted so far was sent."""
        deadline = time.monotonic() + timeout
        while self._items or self._sending:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    async def run(self) -> None:
        from redis.exceptions import NoScriptError  # the `redis` extra: only a Redis store runs this

        delay = 0.05
        last_tick = time.monotonic()
        while True:
            next_tick = last_tick + self._period()  # the period shortens when there is more to watch
            if time.monotonic() >= next_tick:
                await self._tick()
                last_tick = time.monotonic()
                continue
            if not self._items:
                if self.closing:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_tick - time.monotonic()))
                continue
            batch = [self._items[i] for i in range(min(len(self._items), _MAX_BATCH))]
            self._sending = True
            try:
                await self._before_send()
                async with self._redis.pipeline(transaction=False) as pipe:
                    # EVALSHA itself: a script run through the pipeline makes it ask SCRIPT EXISTS
                    # first, one more round trip per batch. A restarted Redis answers NOSCRIPT.
                    for script, keys, args, _ in batch:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    async with asyncio.timeout(self._timeout_s):
                        results = await pipe.execute(raise_on_error=False)
                if any(isinstance(result, NoScriptError) for result in results):
                    for script in {id(item[0]): item[0] for item in batch}.values():
                        await self._redis.script_load(script.script)
                    continue  # the same batch again: every script run in it is idempotent
            except Exception as exc:  # an outage: keep the batch, try again
                if delay == 0.05:
                    logger.warning("moa_stream: the store at %s is unavailable (%s); retrying", self._where, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            for _ in batch:
                self._items.popleft()
            self._sending = False
            for (_, keys, _, done), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):  # refused by Redis itself: retrying cannot help
                    logger.error(
                        "moa_stream: the store at %s refused an update of %s: %s", self._where, keys[0], result
                    )
                    result = None
                if done is not None:
                    try:
                        done(result)
                    except Exception:  # a warning's delivery must not stop the ledger
                        logger.exception("moa_stream: a settlement's follow-up failed")
