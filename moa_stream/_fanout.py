"""Fan-out: run one layer of references concurrently under the quorum-and-grace rule."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import msgspec


class LayerOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How the rule ended a layer: when, after how many successes, and whom it cancelled."""

    allowed_at: float
    """`time.perf_counter()` at which the rule allowed moving on."""
    quorum: int | None = None
    """Successes the rule waited for (None: it waited for every reference)."""
    quorum_met_at: float | None = None
    """Unix time at which the quorum was reached (None without a quorum, or when it never was)."""
    succeeded: int = 0
    """Successes when the rule moved on: the quorum, and those that finished within the grace."""
    cancelled: list[int] = []
    """Indices of the references still running when the rule cancelled them (after the grace); a
    reference cancelled from outside (the caller) is not among them."""


async def run_layer(
    size: int,
    run_one: Callable[[int], Awaitable[bool]],
    *,
    quorum: int | None,
    grace: float,
    task_group: anyio.abc.TaskGroup,
) -> LayerOutcome:
    """Start `run_one(0..size-1)` in `task_group` and return as soon as the rule allows moving on.

    The rule: once `quorum` of them have succeeded (`run_one` returned True), wait at most `grace`
    seconds for the rest, then cancel them; with no quorum, wait for all. Cancelled stragglers wind
    down in `task_group` (the caller's, which outlives this call), so their cleanup is not on the
    path to the next request. `run_one` must record its own outcome when cancelled.
    """
    if size == 0:
        return LayerOutcome(allowed_at=time.perf_counter())
    needed = size if quorum is None else min(quorum, size)
    succeeded = finished = 0
    met_at: float | None = None
    quorum_met = anyio.Event()
    all_done = anyio.Event()
    scopes = [anyio.CancelScope() for _ in range(size)]
    running = set(range(size))

    async def one(index: int) -> None:
        nonlocal succeeded, finished, met_at
        ok = False
        try:
            with scopes[index]:
                ok = await run_one(index)
        finally:
            running.discard(index)
            finished += 1
            succeeded += ok
            if succeeded >= needed and met_at is None:
                met_at = time.time()
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
    allowed_at = time.perf_counter()
    # Whoever is still running now is the rule's to cancel; its own status says "cancelled" either
    # way, so the choice is kept here, where it is made.
    cancelled = sorted(running)
    for scope in scopes:
        scope.cancel()
    return LayerOutcome(
        allowed_at=allowed_at,
        quorum=quorum if quorum is None else needed,
        quorum_met_at=met_at if quorum is not None else None,
        succeeded=succeeded,
        cancelled=cancelled,
    )
