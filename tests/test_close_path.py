"""The close path: closing a stream never waits on the upstream and never skips finalization, and
closing the client ends every call still open, with its events delivered before `close()` returns."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path

import anyio
import openai
import pytest

import moa_stream
from moa_stream import Preset
from moa_stream._sdk import find_engine
from moa_stream.testing import Fault, SimModel, Simulator, sim_client

from .conftest import EventLog
from .scripted import SSE, Gate, Reply, Request, ScriptedUpstream, openai_chunks

USER = [{"role": "user", "content": "Say something"}]
WORDS = ["Closing", "never", "loses", "a", "call."]


class HeldTail:
    """An OpenAI-shaped upstream that sends the answer at once and holds the usage chunk (and
    [DONE]) back until the test opens the gate: a caller who asked for usage but stops at
    finish_reason closes the stream before the usage has arrived."""

    def __init__(self) -> None:
        self.gate: Gate | None = None
        self.upstream = ScriptedUpstream(self.handle)

    def handle(self, request: Request) -> Reply:
        parts = list(openai_chunks(request, WORDS, model="gpt-4o-mini"))
        assert request.asked_usage()
        assert self.gate is not None
        return Reply(headers=SSE, parts=parts, before_part={len(parts) - 2: self.gate.wait})

    def __enter__(self) -> HeldTail:
        self.upstream.__enter__()
        self.gate = self.upstream.gate()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.gate is not None
        self.gate.open()
        self.upstream.__exit__(*exc)


@pytest.fixture
def held() -> Iterator[HeldTail]:
    with HeldTail() as server:
        yield server


def client_for(held: HeldTail, log: EventLog, tmp_path: Path) -> openai.AsyncOpenAI:
    bare = openai.AsyncOpenAI(base_url=held.upstream.base_url, api_key="sk-test", max_retries=0)
    return moa_stream.wrap(bare, sinks=[log], trace_dir=tmp_path)


async def read_to_finish(stream: openai.AsyncStream[openai.types.chat.ChatCompletionChunk]) -> None:
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            return


async def test_close_after_finish_reason_does_not_wait_for_the_usage_tail(
    held: HeldTail, log: EventLog, tmp_path: Path
) -> None:
    client = client_for(held, log, tmp_path)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    await read_to_finish(stream)
    await stream.close()  # returns while the upstream still holds the usage chunk back
    assert not log.of(moa_stream.CallUsage)
    assert held.gate is not None
    held.gate.open()  # the engine's own task reads the tail, then ends the call once
    await log.wait_turns(1)
    [call] = log.of(moa_stream.CallUsage)
    assert (call.status, call.usage_source, call.output_tokens) == ("completed", "reported", len(WORDS))
    await client.close()


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
async def test_cancellation_during_close_still_finalizes_the_call(
    held: HeldTail, log: EventLog, tmp_path: Path, steps: int
) -> None:
    client = client_for(held, log, tmp_path)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    await read_to_finish(stream)
    closing = asyncio.ensure_future(stream.close())
    for _ in range(steps):
        await asyncio.sleep(0)
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    assert held.gate is not None
    held.gate.open()
    await client.close()
    assert len(log.of(moa_stream.CallUsage)) == 1
    assert len(log.of(moa_stream.TurnEnd)) == len(log.of(moa_stream.TurnTrace)) == 1


async def test_client_close_ends_the_tail_reader_it_owns(held: HeldTail, log: EventLog, tmp_path: Path) -> None:
    client = client_for(held, log, tmp_path)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    await read_to_finish(stream)
    await stream.close()
    await client.close()  # the tail never came: the call ends with what is known, before close returns
    [call] = log.of(moa_stream.CallUsage)
    assert (call.status, call.usage_source) == ("completed", "estimated")


async def test_closed_stream_whose_call_did_not_end_is_finalized_when_collected(log: EventLog, tmp_path: Path) -> None:
    sim = Simulator([SimModel(name="m", reply_tokens=40)])
    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[log], trace_dir=tmp_path)
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[arg-type]
    async for _ in stream:
        break
    tee = stream.response.stream._stream  # our tee, inside the HTTP client's timing wrapper
    tee._closed = True  # as if a close had been interrupted before it ended the call
    await tee._inner.aclose()
    del stream, tee
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
        gc.collect()
    await log.wait_turns(1)
    assert [c.status for c in log.of(moa_stream.CallUsage)] == ["closed_early"]
    await client.close()


# -- closing the client with calls open ---------------------------------------------------------


async def test_client_close_with_streams_open_delivers_their_events_before_it_returns(tmp_path: Path) -> None:
    log = EventLog()
    sim = Simulator([SimModel(name="m", reply_tokens=40)])
    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[log], trace_dir=tmp_path)
    streams = []
    for _ in range(3):
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[arg-type]
        await stream.__anext__()
        streams.append(stream)
    await client.close()
    # no waiting: everything is there once close() has returned
    assert [c.status for c in log.of(moa_stream.CallUsage)] == ["closed_early"] * 3
    assert len(log.of(moa_stream.TurnEnd)) == len(log.of(moa_stream.TurnTrace)) == 3
    session = log.of(moa_stream.TurnTrace)[0].session_id
    assert len(list(moa_stream.read_traces(tmp_path / f"{session}.jsonl"))) == 3
    for stream in streams:
        await stream.close()
    assert sum(s.dropped for s in moa_stream.sink_stats(client)) == 0


async def test_client_close_during_a_moa_fan_out_ends_the_turn_once(tmp_path: Path) -> None:
    log = EventLog()
    sim = Simulator([SimModel(name="quick"), SimModel(name="stuck", fault=Fault(kind="stall")), SimModel(name="agg")])
    client = moa_stream.wrap(
        sim_client(sim, max_retries=0),
        sinks=[log],
        trace_dir=tmp_path,
        presets={"p": Preset(references=["quick", "stuck"], aggregator="agg")},
    )

    async def turn() -> None:
        with contextlib.suppress(Exception):
            await client.chat.completions.create(model="moa:p", messages=USER)  # type: ignore[arg-type]

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(turn)
        await log.wait_for(lambda log: len(log.of(moa_stream.ReferenceDone)) == 1)  # `quick` is done
        await client.close()
        assert len(log.of(moa_stream.TurnEnd)) == len(log.of(moa_stream.TurnTrace)) == 1
        tasks.cancel_scope.cancel()
    calls = log.of(moa_stream.CallUsage)
    assert sorted((c.label, c.status) for c in calls) == [("quick", "completed"), ("stuck", "closed_early")]
    assert log.of(moa_stream.TurnEnd)[0].calls == 2


async def test_a_call_ending_after_close_is_counted_in_sink_stats(tmp_path: Path) -> None:
    log = EventLog()
    sim = Simulator([SimModel(name="m")])
    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[log])
    engine = find_engine(client)
    await client.close()
    late = engine.dispatcher
    late.offer(log.events[0] if log.events else _usage())
    assert [s.dropped for s in engine.sink_stats()] == [1]


def _usage() -> moa_stream.CallUsage:
    return moa_stream.CallUsage(
        call_id="c", turn_id="t", session_id="s", role="direct", label="m", model="m", provider="p",
        started_at=0.0, duration_s=0.0, status="completed",
    )  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_call_ended_again_from_inside_its_own_end_is_ended_once(
    stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The collector may run a finalizer at any allocation, so a byte stream's `__del__` backstop can
    # end a call while its own end is half-way (seen with httpx 0.x, whose responses sit in a cycle,
    # on a background response released by a cancel): one CallUsage, the first end's.
    from moa_stream import _meter

    calls: list[_meter.Call] = []
    new_call = _meter.Turn.new_call

    async def recording_new_call(self: _meter.Turn, **options: object) -> _meter.Call:
        call = await new_call(self, **options)  # type: ignore[arg-type]
        calls.append(call)
        return call

    resolve_tokens = _meter.resolve_tokens

    def resolve_after_a_finalizer(*args: object, **options: object) -> object:
        if calls:
            calls.pop().end("closed_early")  # what the backstop would do, run by the collector here
        return resolve_tokens(*args, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(_meter.Turn, "new_call", recording_new_call)
    monkeypatch.setattr(_meter, "resolve_tokens", resolve_after_a_finalizer)
    log = EventLog()
    client = moa_stream.wrap(sim_client(Simulator([SimModel(name="sim-small")])), sinks=[log])
    if stream:
        async with await client.chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as chunks:
            async for _ in chunks:
                pass
    else:
        await client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert [usage.status for usage in log.of(moa_stream.CallUsage)] == ["completed"]
    assert len(log.of(moa_stream.TurnEnd)) == len(log.of(moa_stream.TurnTrace)) == 1


async def test_the_backstop_run_while_its_turn_is_locked_ends_the_call_without_deadlock() -> None:
    # The collector can run a byte stream's `__del__` at any allocation of the thread, also while
    # that thread holds the lock of the stream's own turn; ending the call there would wait for
    # that lock forever. The backstop hands the end to the sink thread instead.
    import threading

    from moa_stream._tee import TeeStream

    log = EventLog()
    client = moa_stream.wrap(sim_client(Simulator([SimModel(name="sim-small")])), sinks=[log])
    stream = await client.chat.completions.create(
        model="sim-small", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    [tee] = [item for item in gc.get_objects() if isinstance(item, TeeStream) and not item._call.ended]
    turn_lock = tee._call.turn._lock

    def finalize_under_the_lock() -> None:
        with turn_lock:
            tee.__del__()  # what the collector would run here

    finalizer = threading.Thread(target=finalize_under_the_lock, daemon=True)
    finalizer.start()
    finalizer.join(10)
    assert not finalizer.is_alive()
    assert await moa_stream.flush(client)
    assert [usage.status for usage in log.of(moa_stream.CallUsage)] == ["closed_early"]
    await stream.close()
    await client.close()
    assert len(log.of(moa_stream.CallUsage)) == 1
