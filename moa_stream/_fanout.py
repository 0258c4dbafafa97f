"""Fan-out: run one layer of references concurrently under the quorum-and-grace rule."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc


async def run_layer(
    size: int,
    run_one: Callable[[int], Awaitable[bool]],
    *,
    quorum: int | None,
    grace: float,
    task_group: anyio.abc.TaskGroup,
) -> float:
    """Start `run_one(0..size-1)` in `task_group` and return as soon as the rule allows moving on.

    The rule: once `quorum` of them have succeeded (`run_one` returned True), wait at most `grace`
    seconds for the rest, then cancel them; with no quorum, wait for all. Cancelled stragglers wind
    down in `task_group` (the caller's, which outlives this call), so their cleanup is not on the
    path to the next request. Returns the `time.perf_counter()` at which the rule was met.
    `run_one` must record its own outcome when cancelled.
    """
    if size == 0:
        return time.perf_counter()
    needed = size if quorum is None else min(quorum, size)
    succeeded = finished = 0
    quorum_met = anyio.Event()
    all_done = anyio.Event()
    scopes = [anyio.CancelScope() for _ in range(size)]

    async def one(index: int) -> None:
        nonlocal succeeded, finished
        ok = False
        try:
            with scopes[index]:
                ok = await run_one(index)
        finally:
            finished += 1
            succeeded += ok
            if succeeded >= needed or finished == size:
                quorum_met.set()
            if finished == size:
                all_done.set()

    for index in range(size):
        task_group.start_soon(one, index)
    await quorum_met.wait()
    if not all_done.is_set():
        with anyio.move_on_after(grace):
            await all_done.wait()
    met_at = time.perf_counter()
    for scope in scopes:
        scope.cancel()
    return met_at
