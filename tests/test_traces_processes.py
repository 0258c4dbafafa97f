"""Processes sharing a trace directory: whole lines only, nobody cuts another's, one session to read."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import moa_stream
from moa_stream._cli import main
from moa_stream._traces import TraceWriter

from .test_traces import trace_record

SESSION = "shared"

# Shared by the worker scripts: a trace record of one turn whose answer is `size` bytes.
RECORD = """
import fcntl, os, sys
import moa_stream
from moa_stream._traces import TraceWriter

def record(turn_id, size):
    text = (turn_id + " ") * (size // (len(turn_id) + 1))
    usage = moa_stream.CallUsage(
        call_id=turn_id, turn_id=turn_id, session_id="shared", role="direct", label="m", model="m",
        provider="p", started_at=0.0, duration_s=0.0, status="completed",
    )
    call = moa_stream.CallRecord(
        call_id=turn_id, role="direct", label="m", model="m", provider="p", input_messages=[],
        output=moa_stream.CallOutput(text=text), output_source="inline", usage=usage,
    )
    end = moa_stream.TurnEnd(
        turn_id=turn_id, session_id="shared", model="m", calls=1, failed_calls=0, input_tokens=0,
        cached_input_tokens=0, output_tokens=0, reasoning_tokens=0, usage_complete=True, cost_usd=0.0,
        cost_complete=True, started_at=0.0, duration_s=0.0, status="completed",
    )
    return moa_stream.TurnTrace(turn_id=turn_id, session_id="shared", model="m", calls=[call], end=end)
"""

PROCESSES = 4
BATCHES = 20
PER_BATCH = 3
LINE = 80 * 1024  # far past PIPE_BUF, and a batch is one write of about 240 KiB

BULK_WRITER = (
    RECORD
    + """
import asyncio

async def main(directory, tag, batches, per_batch, size):
    writer = TraceWriter(directory)
    print("ready", flush=True)
    sys.stdin.readline()  # every process starts writing at once
    for batch in range(batches):
        turns = [record(f"{tag}-{batch * per_batch + i}", size) for i in range(per_batch)]
        await writer.write_batch(turns)
    await writer.aclose()
    print(writer.written, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])))
"""
)


def run(script: str, *argv: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, argv)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str]) -> str:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    return out


def test_processes_appending_large_lines_to_one_session_never_interleave(tmp_path: Path) -> None:
    tags = [f"p{i}" for i in range(PROCESSES)]
    writers = [run(BULK_WRITER, tmp_path, tag, BATCHES, PER_BATCH, LINE) for tag in tags]
    for writer in writers:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    assert [finish(writer) for writer in writers] == [f"{BATCHES * PER_BATCH}\n"] * PROCESSES

    file = tmp_path / f"{SESSION}.jsonl"
    assert file.read_bytes().endswith(b"\n")  # no torn last line either
    traces = list(moa_stream.read_traces(file))  # raises on any line that is not a whole record
    assert Counter(t.turn_id.split("-")[0] for t in traces) == dict.fromkeys(tags, BATCHES * PER_BATCH)
    for tag in tags:  # each process's lines are whole and in its own order
        own = [t for t in traces if t.turn_id.startswith(f"{tag}-")]
        assert [t.turn_id for t in own] == [f"{tag}-{n}" for n in range(BATCHES * PER_BATCH)]
        assert all(t.calls[0].output.text.split() == [t.turn_id] * (LINE // (len(t.turn_id) + 1)) for t in own)


# Writes one line, then a second that the file-size limit cuts short; it stops between the short
# write and the failing one that follows, until told to go on (by then another process has tried).
HALF_WRITER = (
    RECORD
    + """
import asyncio, errno, resource, signal

async def main(directory):
    writer = TraceWriter(directory)
    await writer.write_batch([record("a-0", 8192)])
    size = os.path.getsize(writer.path_for("shared"))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + size // 2, hard))  # room for half a line
    write = os.write

    def paused_write(fd, data):
        written = write(fd, data)
        if written < len(data):
            print("partial", flush=True)
            sys.stdin.readline()
        return written

    os.write = paused_write
    try:
        await writer.write_batch([record("a-1", 8192)])
    except OSError as exc:
        print(errno.errorcode[exc.errno], flush=True)

asyncio.run(main(sys.argv[1]))
"""
)

# Writes one line; says "waiting" if it has to wait for the session file's lock first.
LINE_WRITER = (
    RECORD
    + """
import asyncio

flock = fcntl.flock

def announced_flock(fd, operation):
    if operation == fcntl.LOCK_EX:
        try:
            return flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            print("waiting", flush=True)
    return flock(fd, operation)

fcntl.flock = announced_flock

async def main(directory):
    writer = TraceWriter(directory)
    await writer.write_batch([record("b-0", 8192)])
    print("done", flush=True)

asyncio.run(main(sys.argv[1]))
"""
)


def test_a_partial_write_taken_back_by_one_process_does_not_cut_anothers_line(tmp_path: Path) -> None:
    half = run(HALF_WRITER, tmp_path)
    assert half.stdout is not None
    assert half.stdin is not None
    assert half.stdout.readline() == "partial\n"
    other = run(LINE_WRITER, tmp_path)
    assert other.stdout is not None
    # Either it waits for the lock the half-done write holds, or (without a lock) its line lands
    # right after the half line, where the rollback would cut it.
    assert other.stdout.readline() in ("waiting\n", "done\n")
    half.stdin.write("go on\n")
    half.stdin.flush()
    assert finish(half) == "EFBIG\n"
    finish(other)

    data = (tmp_path / f"{SESSION}.jsonl").read_bytes()
    assert data.endswith(b"\n")
    assert [t.turn_id for t in moa_stream.read_traces(tmp_path / f"{SESSION}.jsonl")] == ["a-0", "b-0"]


def append_one(directory: Path) -> None:
    """Another process's writer, appending one line to session `s` (the one `trace_record` names)."""

    async def append() -> None:
        writer = TraceWriter(directory)
        await writer.write_batch([trace_record()])
        await writer.aclose()

    asyncio.run(append())


def test_a_line_torn_by_a_process_that_died_is_taken_away_before_the_next_is_appended(tmp_path: Path) -> None:
    line = moa_stream.event_encoder.encode(trace_record())
    file = tmp_path / "s.jsonl"
    file.write_bytes(line + b"\n" + line[: len(line) // 2])  # what a writer killed mid-write leaves
    append_one(tmp_path)
    assert file.read_bytes() == (line + b"\n") * 2  # not glued to the torn half into one bad line
    assert len(list(moa_stream.read_traces(file))) == 2


def test_a_whole_line_left_without_its_newline_by_a_process_that_died_is_kept(tmp_path: Path) -> None:
    line = moa_stream.event_encoder.encode(trace_record())
    file = tmp_path / "s.jsonl"
    file.write_bytes(line + b"\n" + line)  # a write cut just before its newline: readers take the line
    append_one(tmp_path)
    assert file.read_bytes() == (line + b"\n") * 3
    assert len(list(moa_stream.read_traces(file))) == 3


def test_without_file_locks_a_single_writer_still_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")  # an NFS mount without lockd

    monkeypatch.setattr(fcntl, "flock", no_locks)

    async def append() -> None:
        writer = TraceWriter(tmp_path)
        await writer.write_batch([trace_record(), trace_record()])
        await writer.aclose()

    asyncio.run(append())
    assert len(list(moa_stream.read_traces(tmp_path / "s.jsonl"))) == 2


# A replica: real turns through a wrapped client on the simulator, for one shared session and one
# of its own.
REPLICA = """
import asyncio, sys
import moa_stream
from moa_stream.testing import sim_client

async def main(directory, tag):
    client = moa_stream.wrap(sim_client(), trace_dir=directory)
    for session in ("shared", f"own-{tag}"):
        with moa_stream.session(session):
            for turn in range(2):
                content = f"{tag} turn {turn} " + "word " * 20_000
                await client.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": content}])
    await client.close()
    [stats] = [s for s in moa_stream.sink_stats(client) if s.name == "trace_writer"]
    print(stats.delivered, stats.failed, stats.dropped, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_readers_see_one_session_across_the_processes_that_wrote_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tags = ["r0", "r1", "r2"]
    replicas = [run(REPLICA, tmp_path, tag) for tag in tags]
    assert [finish(replica) for replica in replicas] == ["4 0 0\n"] * len(tags)

    shared = list(moa_stream.read_traces(tmp_path / f"{SESSION}.jsonl"))
    writers = Counter(t.calls[0].input_messages[0]["content"].split()[0] for t in shared)
    assert writers == dict.fromkeys(tags, 2)

    assert main(["traces", "stats", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["total"]["turns"], stats["total"]["calls"], stats["files"]) == (12, 12, 4)
    [row] = [row for row in stats["by_session"] if row["name"] == SESSION]
    assert (row["turns"], row["calls"]) == (6, 6)  # every replica's
    for trace in shared:  # any replica's turn, found in the one session file
        assert main(["traces", "show", str(tmp_path / f"{SESSION}.jsonl"), "--turn", trace.turn_id]) == 0
        assert f"turn     {trace.turn_id}" in capsys.readouterr().out
