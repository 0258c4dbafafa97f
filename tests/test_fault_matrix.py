"""Randomized fault matrix: whatever the upstream does and however the caller leaves, every call is
accounted for exactly once, the turn ends once, no stream stays open, and the caller sees what the
bare SDK would raise.

The default run is a fixed-seed fast profile; `MOA_FAULT_PROFILE=long pytest tests/test_fault_matrix.py`
runs 10,000 random cases per test, and `MOA_FAULT_CASES=N` any other number.
"""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

import anyio
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moa_stream
from moa_stream import Preset
from moa_stream._sim import Fault, SimModel, Simulator
from moa_stream._sim_transport import sim_client

LONG = os.environ.get("MOA_FAULT_PROFILE") == "long"
CASES = int(os.environ.get("MOA_FAULT_CASES", 10_000 if LONG else 40))
PROFILE = settings(
    max_examples=CASES,
    derandomize=not (LONG or "MOA_FAULT_CASES" in os.environ),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
USER = [{"role": "user", "content": "Tell me about streams"}]

faults = st.one_of(
    st.none(),
    st.builds(
        Fault,
        kind=st.sampled_from(
            [
                "http_429",
                "http_500",
                "disconnect",
                "stall",
                "malformed",
                "stream_error",
                "reject_stream_options",
                "no_usage",
            ]
        ),
        after_chunks=st.integers(0, 6),
        stall_s=st.just(30.0),
    ),
)
behaviours = st.tuples(
    st.sampled_from(["consume", "break", "close", "cancel", "abandon", "wait_for"]), st.integers(0, 8)
)


class Counter:
    def __init__(self) -> None:
        self.events: list[moa_stream.Event] = []

    def __call__(self, event: moa_stream.Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


async def drive(client: openai.AsyncOpenAI, model: str, streamed: bool, behaviour: tuple[str, int]) -> str:
    """Make one call and leave it the way `behaviour` says; returns the exception type's name, or ''."""
    how, at = behaviour
    try:
        if not streamed:
            await client.with_options(timeout=0.3).chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
            return ""
        with anyio.CancelScope() as scope:
            stream = await client.with_options(timeout=0.3).chat.completions.create(
                model=model,
                messages=USER,  # type: ignore[arg-type]
                stream=True,
            )
            if how == "wait_for":  # each chunk from a task of its own, with a deadline
                iterator = stream.__aiter__()
                for _ in range(at + 1):
                    await asyncio.wait_for(iterator.__anext__(), timeout=0.2)
                await stream.close()
                return ""
            seen = 0
            async for _ in stream:
                seen += 1
                if seen > at and how in ("break", "close", "abandon"):
                    break
                if seen > at and how == "cancel":
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()
            if how == "close":
                await stream.close()
            if how == "abandon":
                del stream
                for _ in range(3):
                    await anyio.lowlevel.checkpoint()
                    gc.collect()
        return ""
    except StopAsyncIteration:
        return ""
    except Exception as exc:
        return type(exc).__name__


async def settle(sim: Simulator) -> None:
    for _ in range(3):  # let abandoned generators' finalizer tasks run
        await anyio.lowlevel.checkpoint()
        gc.collect()
    with anyio.fail_after(5):
        await sim.wait_idle()


def expected_calls(sim: Simulator, fault: Fault | None, streamed: bool) -> int:
    # The rejected stream_options probe is ours, not the caller's: it is retried, not reported.
    probe = fault is not None and fault.kind == "reject_stream_options" and streamed
    return sim.stats.requests - probe


@PROFILE
@given(fault=faults, streamed=st.booleans(), behaviour=behaviours, raising_sink=st.booleans())
async def test_direct_call_under_any_fault_and_exit(
    fault: Fault | None, streamed: bool, behaviour: tuple[str, int], raising_sink: bool
) -> None:
    sim = Simulator([SimModel(name="m", fault=fault)])
    counter = Counter()

    def broken(event: moa_stream.Event) -> None:
        raise RuntimeError("sink down")

    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[counter, *([broken] if raising_sink else [])])
    raised = await drive(client, "m", streamed, behaviour)
    await settle(sim)
    await client.close()

    calls = counter.of(moa_stream.CallUsage)
    assert len(calls) == expected_calls(sim, fault, streamed)
    assert len({c.call_id for c in calls}) == len(calls)
    assert len(counter.of(moa_stream.TurnEnd)) == len(counter.of(moa_stream.TurnTrace)) == 1
    assert sim.stats.open_streams == 0
    if behaviour[0] == "consume":
        bare_sim = Simulator([SimModel(name="m", fault=fault)])
        bare = await drive(sim_client(bare_sim, max_retries=0), "m", streamed, behaviour)
        assert raised == bare  # the caller sees what the bare SDK raises
        await settle(bare_sim)


@PROFILE
@given(fault=faults, streamed=st.booleans(), behaviour=behaviours, quorum=st.sampled_from([None, 1]))
async def test_moa_turn_under_any_reference_fault_and_exit(
    fault: Fault | None, streamed: bool, behaviour: tuple[str, int], quorum: int | None
) -> None:
    sim = Simulator([SimModel(name="ok"), SimModel(name="faulty", fault=fault), SimModel(name="agg")])
    counter = Counter()
    preset = Preset(references=["ok", "faulty"], aggregator="agg", quorum=quorum, reference_timeout=0.5)
    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[counter], presets={"p": preset})
    await drive(client, "moa:p", streamed, behaviour)
    await settle(sim)
    await client.close()

    calls = counter.of(moa_stream.CallUsage)
    probe = fault is not None and fault.kind == "reject_stream_options"  # references always stream
    assert len(calls) == sim.stats.requests - probe
    assert len({c.call_id for c in calls}) == len(calls)
    assert len(counter.of(moa_stream.TurnEnd)) == len(counter.of(moa_stream.TurnTrace)) == 1
    assert sim.stats.open_streams == 0
    [aggregator] = [c for c in calls if c.role == "aggregator"] or [None]
    assert aggregator is not None or behaviour[0] == "cancel"  # a failing reference never sinks the turn
