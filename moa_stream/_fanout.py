"""Fan-out: run one layer of references concurrently under the quorum-and-grace rule."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio


async def run_layer(size: int, run_one: Callable[[int], Awaitable[bool]], *, quorum: int | None, grace: float) -> float:
    """Run `run_one(0..size-1)` in one task group and return when the rule allows moving on.

    The rule: once `quorum` of them have succeeded (`run_one` returned True), wait at most `grace`
    seconds for the rest, then cancel them; with no quorum, wait for all. Returns the
    `time.perf_counter()` at which the rule was met, so the caller can measure what follows.
    `run_one` must record its own outcome when cancelled; cancellation here only stops stragglers.
    """
    if size == 0:
        return time.perf_counter()
    needed = size if quorum is None else min(quorum, size)
    succeeded = finished = 0
    quorum_met = anyio.Event()
    all_done = anyio.Event()

    async def one(index: int) -> None:
        nonlocal succeeded, finished
        ok = False
        try:
            ok = await run_one(index)
        finally:
            finished += 1
            succeeded += ok
            if succeeded >= needed or finished == size:
                quorum_met.set()
            if finished == size:
                all_done.set()

    async with anyio.create_task_group() as tasks:
        for index in range(size):
            tasks.start_soon(one, index)
        await quorum_met.wait()
        if not all_done.is_set():
            with anyio.move_on_after(grace):
                await all_done.wait()
        met_at = time.perf_counter()
        tasks.cancel_scope.cancel()
    return met_at
