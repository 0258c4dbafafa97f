"""Randomized fault matrix: whatever the upstream does, however the caller leaves and whatever the
sinks and the trace disk do, every call is accounted for exactly once, the turn ends once, no
stream or sink thread stays open, a sink's loss is counted, no credential reaches an event or a
trace, and the caller sees what the bare SDK would give (its chunks and its exception).

The default run is a fixed-seed fast profile; `MOA_FAULT_PROFILE=long pytest -s tests/test_fault_matrix.py`
runs 10,000 random cases per test (with `-s`, progress every 1,000 cases), and `MOA_FAULT_CASES=N`
any other number; `--hypothesis-seed=N` repeats a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import anyio
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moa_stream
from moa_stream import Preset
from moa_stream._sdk import find_engine
from moa_stream.testing import Fault, FaultKind, SimModel, Simulator, sim_client

from .conftest import EventLog

LONG = os.environ.get("MOA_FAULT_PROFILE") == "long"
CASES = int(os.environ.get("MOA_FAULT_CASES", 10_000 if LONG else 40))
PROFILE = settings(
    max_examples=CASES,
    derandomize=not (LONG or "MOA_FAULT_CASES" in os.environ),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
USER = [{"role": "user", "content": "Tell me about streams"}]
SESSION = "matrix"
KEY = "sk-matrix-credential-5e1f0a"  # echoed back by the `echo_key` fault; must never be recorded

# Everything imported so far lives for the whole run: keeping it out of the collector's view makes
# each case's collections (which find abandoned streams) cheap, about 100x here.
gc.freeze()

faults = st.one_of(
    st.none(),
    st.builds(
        Fault,
        kind=st.sampled_from(get_args(FaultKind)),  # every fault the simulator has, new ones included
        after_chunks=st.integers(0, 6),
        stall_s=st.just(30.0),
    ),
)
behaviours = st.tuples(
    st.sampled_from(["consume", "break", "close", "close_cancelled", "cancel", "abandon", "wait_for"]),
    st.integers(0, 8),
)


async def create(client: openai.AsyncOpenAI, api: str, model: str, *, stream: bool) -> Any:
    """A chat completion, or a Responses API response, of `model` for the case's question."""
    client = client.with_options(timeout=0.3)
    if api == "responses":
        return await client.responses.create(model=model, input=USER[0]["content"], stream=stream)  # type: ignore[call-overload]
    return await client.chat.completions.create(model=model, messages=USER, stream=stream)  # type: ignore[call-overload]


async def drive(
    client: openai.AsyncOpenAI,
    model: str,
    streamed: bool,
    behaviour: tuple[str, int],
    chunks: list[Any] | None = None,
    *,
    api: str = "chat",
) -> str:
    """Make one call and leave it the way `behaviour` says; returns the exception type's name, or ''.
    The chunks or events the caller got (their `to_dict()`) go to `chunks`."""
    how, at = behaviour
    chunks = [] if chunks is None else chunks
    try:
        if not streamed:
            reply = await create(client, api, model, stream=False)
            chunks.append(reply.to_dict())
            return ""
        with anyio.CancelScope() as scope:
            stream = await create(client, api, model, stream=True)
            if how == "wait_for":  # each chunk from a task of its own, with a deadline
                iterator = stream.__aiter__()
                for _ in range(at + 1):
                    await asyncio.wait_for(iterator.__anext__(), timeout=0.2)
                await stream.close()
                return ""
            seen = 0
            async for chunk in stream:
                chunks.append(chunk.to_dict())
                seen += 1
                if seen > at and how in ("break", "close", "close_cancelled", "abandon"):
                    break
                if seen > at and how == "cancel":
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()
            if how == "close":
                await stream.close()
            if how == "close_cancelled":  # the close is cancelled after 0-3 steps of the loop
                closing = asyncio.ensure_future(stream.close())
                for _ in range(at % 4):
                    await asyncio.sleep(0)
                closing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await closing
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


_cases_run = 0


def _progress() -> None:
    # The long profile runs for a while: say how far it is (shown with `pytest -s`).
    global _cases_run
    _cases_run += 1
    if _cases_run % 100 == 0:
        # Hypothesis keeps a tree of every case it ran; out of the collector's view it costs each
        # later case's gc.collect() nothing (otherwise case 5,000 is ~5x slower than case 500).
        gc.freeze()
    if CASES >= 1000 and _cases_run % 1000 == 0:
        print(f"fault matrix: {_cases_run} cases run", file=sys.__stderr__, flush=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Raising and stuck sinks are logged with tracebacks; pytest keeps every record of a test, and
    # the frames they hold made each later case's collection slower (the long profile went quadratic).
    logger = logging.getLogger("moa_stream")
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = False


def assert_no_task_left() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not others, f"tasks still running: {others}"


def expected_calls(sim: Simulator) -> int:
    # A rejected stream_options probe is ours, not the caller's: it is retried, not reported.
    return sim.stats.requests - sim.stats.rejected_stream_options


class Sinks:
    """The sinks of one case: an event log that always works, one sink with the case's fault, and a
    trace directory that may be gone or full; `check` asserts what each of them must have seen."""

    def __init__(self, sink_fault: str, trace_fault: str | None, directory: Path) -> None:
        self.log = EventLog()
        self.sink_fault = sink_fault
        self.trace_fault = trace_fault
        self.release = threading.Event()
        self.trace_dir = directory / "traces"
        faulty: dict[str, moa_stream.Sink] = {
            "raising": self._raising,
            "blocking": self._blocking,
            "stuck": self._stuck_async,
        }
        self.sinks = [self.log, *([faulty[sink_fault]] if sink_fault in faulty else [])]
        self.trace_dir.mkdir()
        if trace_fault == "disk_full":
            (self.trace_dir / f"{SESSION}.jsonl").symlink_to("/dev/full")

    def wrap(self, upstream: openai.AsyncOpenAI, **options: Any) -> openai.AsyncOpenAI:
        client = moa_stream.wrap(
            upstream,
            sinks=self.sinks,
            trace_dir=None if self.trace_fault is None else self.trace_dir,
            drain_timeout=0.1 if self.sink_fault == "stuck" else 10.0,
            **options,
        )
        if self.trace_fault == "dir_gone":  # removed and replaced by a file after wrap() checked it
            self.trace_dir.rmdir()
            self.trace_dir.write_text("")
        return client

    def _raising(self, event: moa_stream.Event) -> None:
        raise RuntimeError("sink down")

    def _blocking(self, event: moa_stream.Event) -> None:
        self.release.wait()

    async def _stuck_async(self, event: moa_stream.Event) -> None:
        await anyio.sleep_forever()

    async def finish(self, client: openai.AsyncOpenAI) -> None:
        """Close the client the way the case says: a blocking sink is let go only after the log sink
        saw the whole turn, which proves the caller and the other sinks never waited for it."""
        await self.log.wait_turns(1)
        self.release.set()
        await client.close()

    def check(self, client: openai.AsyncOpenAI) -> None:
        log = self.log
        assert len(log.of(moa_stream.TurnEnd)) == len(log.of(moa_stream.TurnTrace)) == 1
        for end in log.of(moa_stream.TurnEnd):  # a failed turn says why, in one line
            assert (end.status == "error") == (end.error is not None)
            assert end.error is None or "\n" not in end.error
        recorded = [moa_stream.event_encoder.encode(e) for e in log.events]
        if self.trace_dir.is_dir():  # (the disk-full case's file is /dev/full, which reads forever)
            recorded += [path.read_bytes() for path in self.trace_dir.glob("*.jsonl") if not path.is_symlink()]
        assert not any(KEY.encode() in text for text in recorded)
        engine = find_engine(client)
        stats = {s.name: s for s in engine.sink_stats()}
        count = len(log.events)
        assert stats["EventLog"].delivered == count
        faulty = next((s for name, s in stats.items() if name.startswith("Sinks.")), None)
        if self.sink_fault != "none":
            assert faulty is not None
            # raising: every event fails; blocking: every event arrives late; stuck: abandoned at close, counted
            expected = {"raising": (0, count, 0), "blocking": (count, 0, 0), "stuck": (0, 0, count)}
            assert (faulty.delivered, faulty.failed, faulty.dropped) == expected[self.sink_fault]
        thread = engine.dispatcher._thread
        if thread is not None:  # close waits for it a bounded time; on a loaded machine it may end just after
            thread.join(10)
            assert not thread.is_alive()
        if self.trace_fault is not None:
            writer = stats["trace_writer"]
            if self.trace_fault == "ok":
                [record] = moa_stream.read_traces(self.trace_dir / f"{SESSION}.jsonl")
                assert (writer.delivered, record.turn_id) == (1, log.of(moa_stream.TurnTrace)[0].turn_id)
            else:
                assert (writer.failed, writer.delivered) == (1, 0)  # a counted, reported loss


async def run_case(
    sim: Simulator,
    model: str,
    streamed: bool,
    behaviour: tuple[str, int],
    sink_fault: str,
    trace_fault: str | None,
    chunks: list[Any] | None = None,
    *,
    api: str = "chat",
    **options: Any,
) -> tuple[str, list[moa_stream.CallUsage]]:
    """Make one call under the case's faults, check the invariants every case shares, and return
    what the caller raised and the calls' usage events (the caller's chunks go to `chunks`)."""
    _progress()
    with tempfile.TemporaryDirectory() as directory, _quiet():
        sinks = Sinks(sink_fault, trace_fault, Path(directory))
        client = sinks.wrap(sim_client(sim, max_retries=0, api_key=KEY), **options)
        with moa_stream.session(SESSION):
            raised = await drive(client, model, streamed, behaviour, chunks, api=api)
        await settle(sim)
        await sinks.finish(client)
        sinks.check(client)
        assert_no_task_left()
    calls = sinks.log.of(moa_stream.CallUsage)
    assert len(calls) == expected_calls(sim)  # one per upstream call the caller caused
    assert len({c.call_id for c in calls}) == len(calls)
    assert sim.stats.open_streams == 0
    return raised, calls


sink_faults = st.sampled_from(["none", "raising", "blocking", "stuck"])
trace_faults = st.sampled_from([None, "ok", "dir_gone", "disk_full"])


apis = st.sampled_from(["chat", "responses"])


@PROFILE
@given(
    fault=faults,
    api=apis,
    streamed=st.booleans(),
    behaviour=behaviours,
    sink_fault=sink_faults,
    trace_fault=trace_faults,
)
async def test_direct_call_under_any_fault_and_exit(
    fault: Fault | None, api: str, streamed: bool, behaviour: tuple[str, int], sink_fault: str, trace_fault: str | None
) -> None:
    sim = Simulator([SimModel(name="m", fault=fault)])
    got: list[Any] = []
    raised, _ = await run_case(sim, "m", streamed, behaviour, sink_fault, trace_fault, got, api=api)
    if behaviour[0] == "consume":
        bare_sim = Simulator([SimModel(name="m", fault=fault)])
        expected: list[Any] = []
        bare_client = sim_client(bare_sim, max_retries=0, api_key=KEY)
        bare = await drive(bare_client, "m", streamed, behaviour, expected, api=api)
        assert (raised, got) == (bare, expected)  # the caller sees what the bare SDK gives
        await settle(bare_sim)


@PROFILE
@given(
    faults=st.tuples(faults, faults),
    api=st.sampled_from(["chat", "responses", "responses_bridged"]),
    streamed=st.booleans(),
    behaviour=behaviours,
    quorum=st.sampled_from([None, 1]),
    on_all_failed=st.sampled_from(["aggregator_alone", "error"]),
    sink_fault=sink_faults,
    trace_fault=trace_faults,
)
async def test_moa_turn_under_any_reference_fault_and_exit(
    faults: tuple[Fault | None, Fault | None],
    api: str,
    streamed: bool,
    behaviour: tuple[str, int],
    quorum: int | None,
    on_all_failed: Literal["aggregator_alone", "error"],
    sink_fault: str,
    trace_fault: str | None,
) -> None:
    models = [SimModel(name="r1", fault=faults[0]), SimModel(name="r2", fault=faults[1]), SimModel(name="agg")]
    bridged = api == "responses_bridged"  # an upstream without /responses: the aggregator is bridged
    sim = Simulator(models, responses=not bridged)
    preset = Preset(
        references=["r1", "r2"], aggregator="agg", quorum=quorum, reference_timeout=0.5, on_all_failed=on_all_failed
    )
    raised, calls = await run_case(
        sim, "moa:p", streamed, behaviour, sink_fault, trace_fault, api=api.split("_")[0], presets={"p": preset}
    )
    references = [c for c in calls if c.role == "reference"]
    learned = [c for c in calls if c.role == "aggregator" and c.http_status == 404]
    assert len(learned) == (1 if bridged and any(c.role == "aggregator" for c in calls) else 0)
    aggregators = [c for c in calls if c.role == "aggregator" and c not in learned]
    all_failed = bool(references) and all(c.status != "completed" for c in references)
    if raised == "InternalServerError":  # the preset's "error" policy: a 502, before any aggregator call
        assert (on_all_failed, all_failed, aggregators) == ("error", True, [])
    elif behaviour[0] != "cancel":
        assert len(aggregators) == 1  # failing references never sink the turn


@PROFILE
@given(
    streams=st.lists(st.tuples(faults, st.integers(0, 4)), max_size=3),
    moa_turn=st.sampled_from([None, 0, 1, 2]),
    trace=st.booleans(),
)
async def test_client_close_with_any_calls_still_open(
    streams: list[tuple[Fault | None, int]], moa_turn: int | None, trace: bool
) -> None:
    """Closing the client with 0-3 streams open (each read to a random depth) and maybe a MoA turn
    in flight (closed after 0-2 of its references ended) ends every call and turn once, with every
    event delivered and every trace line written before `close()` returns."""
    _progress()
    models = [SimModel(name=f"s{i}", fault=fault) for i, (fault, _) in enumerate(streams)]
    models += [SimModel(name="r1"), SimModel(name="r2", tokens_per_s=50.0), SimModel(name="agg")]
    sim = Simulator(models)
    log = EventLog()
    with tempfile.TemporaryDirectory() as directory, _quiet(), moa_stream.session(SESSION):
        trace_dir = Path(directory) if trace else None
        preset = Preset(references=["r1", "r2"], aggregator="agg", reference_timeout=5.0)
        client = moa_stream.wrap(
            sim_client(sim, max_retries=0, api_key=KEY), sinks=[log], trace_dir=trace_dir, presets={"p": preset}
        )
        opened = []
        for i, (_, depth) in enumerate(streams):
            try:
                stream = await client.with_options(timeout=0.3).chat.completions.create(
                    model=f"s{i}",
                    messages=USER,  # type: ignore[arg-type]
                    stream=True,
                )
            except openai.APIError:  # refused before the body (429, 500, a bad key): a turn that has ended
                continue
            with contextlib.suppress(Exception):
                for _ in range(depth):
                    await stream.__anext__()
            opened.append(stream)
        async with anyio.create_task_group() as tasks:
            if moa_turn is not None:

                async def turn() -> None:
                    with contextlib.suppress(Exception):
                        await client.chat.completions.create(model="moa:p", messages=USER)  # type: ignore[arg-type]

                tasks.start_soon(turn)
                started = moa_stream.ReferenceStarted  # the turn is under way before the client closes
                await log.wait_for(
                    lambda log: bool(log.of(started)) and len(log.of(moa_stream.ReferenceDone)) >= moa_turn
                )
            await client.close()
            # no waiting from here on: close() has delivered everything
            turns = len(streams) + (moa_turn is not None)
            assert len(log.of(moa_stream.TurnEnd)) == len(log.of(moa_stream.TurnTrace)) == turns
            assert len(log.of(moa_stream.CallUsage)) == expected_calls(sim)
            if trace_dir is not None and turns:
                assert len(list(moa_stream.read_traces(trace_dir / f"{SESSION}.jsonl"))) == turns
            assert sum(s.dropped + s.failed for s in moa_stream.sink_stats(client)) == 0
            tasks.cancel_scope.cancel()
        for stream in opened:
            await stream.close()
        await settle(sim)
        assert_no_task_left()
