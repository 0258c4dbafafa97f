"""Session ledger and session state: totals equal the events, survive restarts and crashes, and a
sidecar is only ever replaced whole."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

import moa_stream
from moa_stream import Preset, Totals
from moa_stream._sdk import find_engine
from moa_stream._sidecar import SessionChanged, SessionLedger, SidecarWrite, SidecarWriter, Snapshot, write_atomically
from moa_stream.testing import SimModel, Simulator, sim_client

from .conftest import EventLog, chat_once

USER = [{"role": "user", "content": "Tell me about streams"}]
# Every turn calls its references (the default cadence would let a turn that starts after another
# one's references reuse them, and how many do depends on timing).
PRESETS = {
    "trio": Preset(references=["sim-small", "sim-large", "sim-nameless"], aggregator="sim-small", cadence="per_call")
}


def sim_models() -> Simulator:
    return Simulator([SimModel(name="sim-small"), SimModel(name="sim-large"), SimModel(name="sim-nameless")])


def summed(usages: list[moa_stream.CallUsage]) -> Totals:
    totals = Totals()
    for usage in usages:
        totals = totals.plus(usage)
    return totals


async def test_concurrent_turns_on_one_session_total_the_sum_of_their_events(tmp_path: Path) -> None:
    sim, log = sim_models(), EventLog()
    client = moa_stream.wrap(sim_client(sim), sinks=[log], trace_dir=tmp_path, presets=PRESETS)
    with moa_stream.session("busy"):
        async with anyio.create_task_group() as group:
            for number in range(40):
                model = ["sim-small", "sim-large", "moa:trio", "sim-nameless"][number % 4]
                group.start_soon(partial(chat_once, client, model, stream=number % 3 != 0))
    await client.close()  # every call has ended: a stream closed at its finish may end a moment later
    ledger = moa_stream.session_ledger(client, "busy")

    usages = log.of(moa_stream.CallUsage)
    assert len(usages) == 10 * 1 * 3 + 10 * 4  # 30 direct calls, 10 MoA turns of 3 references + 1 aggregator
    assert ledger.totals == summed(usages)
    assert ledger.turns == len(log.of(moa_stream.TurnEnd)) == 40
    for model in ("sim-small", "sim-large", "sim-nameless"):
        assert ledger.by_model[model] == summed([u for u in usages if u.model == model])
    for role in ("direct", "reference", "aggregator"):
        assert ledger.by_role[role] == summed([u for u in usages if u.role == role])
    assert ledger.totals.unpriced_calls == len([u for u in usages if u.model == "sim-nameless"])
    assert not ledger.totals.cost_complete

    # The sidecar holds the same totals, and a new process (here: a new client) starts from them.
    again = moa_stream.wrap(sim_client(sim), trace_dir=tmp_path)
    assert moa_stream.session_ledger(again, "busy") == ledger
    await again.close()


async def test_totals_continue_across_a_restart(tmp_path: Path) -> None:
    sim = sim_models()
    first = moa_stream.wrap(sim_client(sim), trace_dir=tmp_path)
    with moa_stream.session("s"):
        for _ in range(2):
            await chat_once(first, "sim-small", stream=True)
    before = moa_stream.session_ledger(first, "s")
    await first.close()

    second = moa_stream.wrap(sim_client(sim), trace_dir=tmp_path)
    with moa_stream.session("s"):
        assert moa_stream.session_ledger(second) == before
        await chat_once(second, "sim-small", stream=False)
        after = moa_stream.session_ledger(second)
    await second.close()
    assert (before.turns, after.turns) == (2, 3)
    assert after.totals.calls == 3
    assert after.totals.output_tokens > before.totals.output_tokens
    sidecar = json.loads((tmp_path / "s.state.json").read_text())
    assert sidecar["ledger"]["totals"]["calls"] == 3


@pytest.mark.parametrize("content", [None, b"", b"  \n"])
async def test_a_missing_or_empty_sidecar_is_an_empty_ledger(tmp_path: Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / "fresh.state.json").write_bytes(content)
    client = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
    ledger = moa_stream.session_ledger(client, "fresh")
    assert (ledger.turns, ledger.totals) == (0, Totals())
    await client.close()


CORRUPT = [b'{"format": 1, "version": 3, "ledger": {"session_id": "bad", "totals": {"calls": 2', b"\x00\xff garbage"]


@pytest.mark.parametrize("content", CORRUPT)
async def test_a_corrupt_sidecar_is_reported_and_never_overwritten(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = tmp_path / "bad.state.json"
    sidecar.write_bytes(content)
    client = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
    with caplog.at_level(logging.ERROR, logger="moa_stream"), moa_stream.session("bad"):
        await chat_once(client, "sim-small", stream=True)  # no budget: the call goes on, counted in memory
        assert moa_stream.session_ledger(client).totals.calls == 1
        with pytest.raises(moa_stream.SessionStateError, match=r"bad\.state\.json"):
            moa_stream.session_state(client).get("anything")
    await client.close()
    assert sidecar.read_bytes() == content
    [record] = [r for r in caplog.records if "bad.state.json" in r.getMessage()]
    assert "not a valid session state file" in record.getMessage()


async def test_a_corrupt_sidecar_refuses_calls_when_a_session_budget_needs_its_totals(tmp_path: Path) -> None:
    sim = sim_models()
    (tmp_path / "bad.state.json").write_bytes(CORRUPT[0])
    budget = moa_stream.Budget(session=moa_stream.Limits(cost_usd=1.0))
    client = moa_stream.wrap(sim_client(sim, max_retries=0), trace_dir=tmp_path, budget=budget)
    with moa_stream.session("bad"), pytest.raises(openai.InternalServerError, match=r"bad\.state\.json.*left as it is"):
        await chat_once(client, "sim-small", stream=True)
    await client.close()
    assert sim.stats.requests == 0
    assert (tmp_path / "bad.state.json").read_bytes() == CORRUPT[0]


def test_a_failed_write_leaves_the_previous_sidecar_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.state.json"
    write_atomically(path, b'{"old": true}')

    def disk_failure(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("moa_stream._sidecar.os.fsync", disk_failure)
    with pytest.raises(OSError, match="Input/output"):
        write_atomically(path, b'{"new": true}')
    assert path.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["s.state.json"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_the_sidecar_ends_with_the_newest_snapshot_under_concurrent_writers(tmp_path: Path) -> None:
    client = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
    state = moa_stream.session_state(client, "hot")

    def writer(name: str) -> None:
        for number in range(200):
            state.set(name, number)

    async with anyio.create_task_group() as group:
        for name in ("a", "b", "c"):
            group.start_soon(anyio.to_thread.run_sync, writer, name)
        with moa_stream.session("hot"):
            for _ in range(5):
                group.start_soon(partial(chat_once, client, "sim-small", stream=True))
    assert await moa_stream.flush(client)
    on_disk = json.loads((tmp_path / "hot.state.json").read_text())
    assert on_disk["state"] == {"a": 199, "b": 199, "c": 199}
    assert on_disk["ledger"] == json.loads(moa_stream.event_encoder.encode(moa_stream.session_ledger(client, "hot")))
    await client.close()


async def test_session_state_is_kept_in_the_sidecar_not_in_traces(tmp_path: Path) -> None:
    sim = sim_models()
    seen: list[str] = []
    client = moa_stream.wrap(sim_client(sim), trace_dir=tmp_path)

    def sink(event: moa_stream.Event) -> None:
        # A sink reaches the state of the event's session.
        if isinstance(event, moa_stream.TurnEnd):
            moa_stream.session_state(client, event.session_id).set("last_turn", event.turn_id)
            seen.append(event.turn_id)

    moa_stream.add_sink(client, sink)
    with moa_stream.session("notes"):
        state = moa_stream.session_state(client)
        state.set("customer", {"plan": "pro", "secret-marker": "s3cr3t-value"})
        state.set("scratch", 1)
        state.delete("scratch")
        state.delete("never-set")
        with pytest.raises(TypeError, match="JSON"):
            state.set("bad", object())
        await chat_once(client, "sim-small", stream=True)
        assert await moa_stream.flush(client)
        assert state.keys() == ["customer", "last_turn"]
        assert state.get("last_turn") == seen[0]
        assert state.get("missing", "default") == "default"
    await client.close()
    assert b"s3cr3t-value" not in (tmp_path / "notes.jsonl").read_bytes()
    assert b"s3cr3t-value" in (tmp_path / "notes.state.json").read_bytes()

    restarted = moa_stream.wrap(sim_client(sim), trace_dir=tmp_path)
    assert moa_stream.session_state(restarted, "notes").items() == {
        "customer": {"plan": "pro", "secret-marker": "s3cr3t-value"},
        "last_turn": seen[0],
    }
    await restarted.close()


async def test_without_a_trace_dir_the_ledger_lives_in_memory(tmp_path: Path) -> None:
    client = moa_stream.wrap(sim_client(sim_models()))
    with moa_stream.session("mem"):
        await chat_once(client, "sim-small", stream=True)
        moa_stream.session_state(client).set("k", "v")
        assert moa_stream.session_state(client).get("k") == "v"
        assert moa_stream.session_ledger(client).totals.calls == 1
    await client.close()
    assert [s.name for s in moa_stream.sink_stats(client)] == []


KILLED_WRITER = """
import asyncio, sys, moa_stream
from moa_stream.testing import sim_client

async def main():
    client = moa_stream.wrap(sim_client(), trace_dir=sys.argv[1])
    with moa_stream.session("killed"):
        turns = 0
        while True:
            await client.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": "hi"}])
            moa_stream.session_state(client).set("turns_seen", turns)
            turns += 1
            if turns % 5 == 0:
                await moa_stream.flush(client)  # from here on the sidecar holds at least `turns`
                print(turns, flush=True)

asyncio.run(main())
"""


def test_a_process_killed_between_writes_leaves_a_valid_sidecar_and_a_restart_restores_it(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    flushed = 0
    for _ in range(30):
        flushed = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)

    sidecar = json.loads((tmp_path / "killed.state.json").read_bytes())  # whole, never torn
    assert sidecar["ledger"]["session_id"] == "killed"

    async def restart() -> tuple[Any, Any, int]:
        client = moa_stream.wrap(sim_client(), trace_dir=tmp_path)
        with moa_stream.session("killed"):
            restored = moa_stream.session_ledger(client)
            await client.chat.completions.create(model="sim-fast", messages=USER)  # type: ignore[arg-type]
            after = moa_stream.session_ledger(client)
            seen = moa_stream.session_state(client).get("turns_seen")
        await client.close()
        return restored, after, seen

    restored, after, seen = anyio.run(restart)
    assert restored.turns >= flushed
    assert restored.totals.calls == restored.turns  # one call per turn, none half-counted
    assert seen >= flushed - 1
    assert (after.turns, after.totals.calls) == (restored.turns + 1, restored.totals.calls + 1)
    assert json.loads((tmp_path / "killed.state.json").read_bytes())["ledger"]["turns"] == after.turns


def test_sidecar_writes_are_off_the_callers_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The writer runs on the sink thread: the caller's thread never waits for the fsync.
    threads: set[str] = set()
    original = write_atomically

    def spy(path: Path, data: bytes) -> None:
        threads.add(threading.current_thread().name)
        original(path, data)

    async def main() -> None:
        client = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
        await chat_once(client, "sim-small", stream=True)
        await client.close()

    monkeypatch.setattr("moa_stream._sidecar.write_atomically", spy)
    anyio.run(main)
    assert threads
    assert threading.main_thread().name not in threads


async def test_idle_sessions_beyond_the_cap_are_let_go_and_read_back_unchanged(tmp_path: Path) -> None:
    client = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
    store = find_engine(client).store
    store.max_sessions = 3
    for number in range(10):
        with moa_stream.session(f"user-{number}"):
            await chat_once(client, "sim-small", stream=number % 2 == 0)
            moa_stream.session_state(client).set("number", number)
        assert await moa_stream.flush(client)  # written, so idle sessions may go
    assert len(store._sessions) <= 4  # the cap, plus the one being loaded when it was reached
    for number in range(10):
        ledger = moa_stream.session_ledger(client, f"user-{number}")
        assert (ledger.turns, ledger.totals.calls) == (1, 1)
        assert moa_stream.session_state(client, f"user-{number}").get("number") == number
    await client.close()


@pytest.mark.parametrize(
    ("value", "error", "says"),
    [
        ({1, 2}, TypeError, "set"),
        (b"raw", TypeError, "bytes"),
        (float("nan"), ValueError, "nan"),
        ({"nested": [1, float("inf")]}, ValueError, r"\['nested'\]\[1\]"),
        ({1: "int key"}, TypeError, "key"),
        (object(), TypeError, "object"),
    ],
)
async def test_session_state_refuses_what_json_would_change_before_anything_changes(
    tmp_path: Path, value: object, error: type[Exception], says: str
) -> None:
    client = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
    state = moa_stream.session_state(client, "strict")
    state.set("kept", "as it was")
    with pytest.raises(error, match=says):
        state.set("bad", value)
    assert state.items() == {"kept": "as it was"}
    await client.close()


async def test_session_state_reads_back_in_process_what_a_restart_reads(tmp_path: Path) -> None:
    value = {"pair": (1, 2), "deep": [{"t": (True, None)}], "big": 2**53, "x": 1.5}
    client = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
    moa_stream.session_state(client, "same").set("v", value)
    here = moa_stream.session_state(client, "same").get("v")
    await client.close()
    restarted = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
    assert here == moa_stream.session_state(restarted, "same").get("v") == json.loads(json.dumps(value))
    await restarted.close()


async def test_a_busy_session_is_written_once_per_interval_and_whole_at_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An atomic replace costs two fsyncs, more than many turns: a session that changes all the time
    # is written once at first, then once when the interval ends or a flush comes.
    writes: list[bytes] = []

    def spy(path: Path, data: bytes) -> None:
        writes.append(data)
        write_atomically(path, data)

    monkeypatch.setattr("moa_stream._sidecar.write_atomically", spy)
    client = moa_stream.wrap(sim_client(sim_models()), trace_dir=tmp_path)
    with moa_stream.session("busy"):
        for number in range(12):
            await chat_once(client, "sim-small", stream=number % 2 == 0)
            await anyio.sleep(0.03)  # past the dispatcher's linger: each turn comes in a batch of its own
    assert await moa_stream.flush(client)
    assert 1 <= len(writes) <= 3  # the first change, perhaps one interval's end, and the flush
    on_disk = json.loads((tmp_path / "busy.state.json").read_bytes())
    assert on_disk["ledger"]["turns"] == moa_stream.session_ledger(client, "busy").turns == 12
    await client.close()


async def test_a_change_within_the_interval_is_written_when_it_ends_without_a_flush(tmp_path: Path) -> None:
    versions = iter(range(1, 100))
    written: list[tuple[str, int]] = []
    third = anyio.Event()

    synced: dict[str, SessionLedger] = {}

    def record(session_id: str, write: SidecarWrite, merged: Snapshot) -> None:
        synced[session_id] = merged.ledger  # what a store does: the next write adds to the file
        written.append((session_id, merged.ledger.turns))
        if len(written) == 3:
            third.set()

    def pending(session_id: str) -> SidecarWrite:
        snapshot = Snapshot(SessionLedger(session_id=session_id, turns=next(versions)), {}, 0)
        base = synced.get(session_id, SessionLedger(session_id=session_id))
        return SidecarWrite(tmp_path / f"{session_id}.state.json", snapshot, base, frozenset())

    writer = SidecarWriter(pending, record, interval_s=0.2)
    changed = SessionChanged(session_id="s")
    await writer.write_batch([changed])  # written at once
    await writer.write_batch([changed])
    await writer.write_batch([changed, SessionChanged(session_id="t")])  # "t" is new: at once
    assert [session for session, _ in written] == ["s", "t"]
    with anyio.fail_after(5):
        await third.wait()
    assert written[2][0] == "s"  # the two changes of "s" within its interval: one write when it ended
    assert json.loads((tmp_path / "s.state.json").read_bytes())["ledger"]["turns"] == 3
    await writer.aclose()
    assert len(written) == 3  # nothing was left due
