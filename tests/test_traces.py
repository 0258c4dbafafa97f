"""Trace records: one JSON line per turn, per session file, private, readable after a crash."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import openai
import pytest

import moa_stream
from moa_stream._sdk import find_engine

from .conftest import EventLog

USER = [{"role": "user", "content": "Tell me about streams"}]


def trace_record() -> moa_stream.TurnTrace:
    end = moa_stream.TurnEnd(
        turn_id="t",
        session_id="s",
        model="m",
        calls=0,
        failed_calls=0,
        input_tokens=0,
        cached_input_tokens=0,
        output_tokens=0,
        reasoning_tokens=0,
        usage_complete=True,
        cost_usd=0.0,
        cost_complete=True,
        started_at=0.0,
        duration_s=0.0,
        status="completed",
    )
    return moa_stream.TurnTrace(turn_id="t", session_id="s", model="m", calls=[], end=end)


async def test_close_drains_trace_lines_to_the_session_file(upstream: openai.AsyncOpenAI, tmp_path: Path) -> None:
    client = moa_stream.wrap(upstream, trace_dir=tmp_path)
    with moa_stream.session("alice"):
        stream = await client.chat.completions.create(model="sim-small", messages=USER, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.chat.completions.create(model="sim-large", messages=USER)
    await client.close()
    first, second = moa_stream.read_traces(tmp_path / "alice.jsonl")
    assert first.calls[0].output.text == text
    assert first.calls[0].input_messages == USER
    assert first.end.calls == 1
    assert second.calls[0].output_source == "inline"
    assert second.model == "sim-large"


async def test_trace_directory_and_files_are_private(upstream: openai.AsyncOpenAI, tmp_path: Path) -> None:
    trace_dir = tmp_path / "traces"
    client = moa_stream.wrap(upstream, trace_dir=trace_dir)
    with moa_stream.session("bob"):
        await client.chat.completions.create(model="sim-small", messages=USER)
    await client.close()
    assert stat.S_IMODE(trace_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((trace_dir / "bob.jsonl").stat().st_mode) == 0o600


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "/abs/path", "nul\x00byte", "x" * 500, ".hidden", ""])
def test_session_ids_cannot_escape_the_trace_directory(hostile: str, tmp_path: Path) -> None:
    safe = moa_stream.sanitize_session_id(hostile)
    assert safe
    assert len(safe) <= 100
    assert "/" not in safe
    assert "\x00" not in safe
    assert not safe.startswith(".")
    assert (tmp_path / f"{safe}.jsonl").resolve().parent == tmp_path.resolve()


def test_distinct_ids_stay_distinct_after_sanitizing() -> None:
    assert moa_stream.sanitize_session_id("a/b") != moa_stream.sanitize_session_id("a_b")
    assert moa_stream.sanitize_session_id("plain-id_1.2") == "plain-id_1.2"


def test_torn_final_line_is_skipped_but_a_torn_middle_line_is_an_error(tmp_path: Path) -> None:
    line = moa_stream.event_encoder.encode(trace_record())
    torn_end = tmp_path / "end.jsonl"
    torn_end.write_bytes(line + b"\n" + line[:25])
    assert len(list(moa_stream.read_traces(torn_end))) == 1
    torn_middle = tmp_path / "middle.jsonl"
    torn_middle.write_bytes(line[:25] + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match=r"middle\.jsonl:1"):
        list(moa_stream.read_traces(torn_middle))


def test_trace_dir_that_is_a_file_is_rejected_at_wrap(upstream: openai.AsyncOpenAI, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ValueError, match="trace_dir"):
        moa_stream.wrap(upstream, trace_dir=not_a_dir)


def test_wrap_rejects_what_is_not_an_async_openai_client() -> None:
    with pytest.raises(TypeError, match=r"got openai\.OpenAI$"):
        moa_stream.wrap(openai.OpenAI(api_key="k"))  # type: ignore[type-var]
    with pytest.raises(TypeError, match="str"):
        moa_stream.wrap("http://localhost")  # type: ignore[type-var]


async def test_wrapping_twice_is_refused(upstream: openai.AsyncOpenAI) -> None:
    client = moa_stream.wrap(upstream)
    with pytest.raises(ValueError, match="already wrapped"):
        moa_stream.wrap(client)
    await client.close()


async def test_azure_client_stays_azure(tmp_path: Path) -> None:
    azure = openai.AsyncAzureOpenAI(api_key="k", api_version="2024-10-21", azure_endpoint="https://example.invalid")
    client = moa_stream.wrap(azure)
    assert isinstance(client, openai.AsyncAzureOpenAI)
    assert find_engine(client) is not None
    await client.close()


def test_files_are_created_with_private_mode_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        from moa_stream._traces import TraceWriter

        writer = TraceWriter(tmp_path / "t")
        assert stat.S_IMODE(writer.directory.stat().st_mode) == 0o700
    finally:
        os.umask(old)


async def test_a_rotated_trace_file_is_opened_anew(upstream: openai.AsyncOpenAI, tmp_path: Path) -> None:
    client = moa_stream.wrap(upstream, trace_dir=tmp_path)
    with moa_stream.session("rotating"):
        await client.chat.completions.create(model="sim-small", messages=USER)
        assert await moa_stream.flush(client)
        (tmp_path / "rotating.jsonl").rename(tmp_path / "rotating.jsonl.1")  # what logrotate does
        await client.chat.completions.create(model="sim-large", messages=USER)
    await client.close()
    [old] = moa_stream.read_traces(tmp_path / "rotating.jsonl.1")
    [new] = moa_stream.read_traces(tmp_path / "rotating.jsonl")
    assert (old.model, new.model) == ("sim-small", "sim-large")


CRASHING_WRITER = """
import asyncio, sys, moa_stream
from moa_stream.testing import sim_client

async def main():
    client = moa_stream.wrap(sim_client(), trace_dir=sys.argv[1])
    big = "word " * 40_000  # ~200 kB per trace line, so the kill is likely to land during a write
    with moa_stream.session("crash"):
        while True:
            await client.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": big}])
            print("turn", flush=True)

asyncio.run(main())
"""


def test_a_writer_killed_mid_write_leaves_only_whole_lines_but_the_last(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    for _ in range(20):  # let it get well into writing
        assert writer.stdout.readline() == "turn\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    writer.stdout.close()
    data = (tmp_path / "crash.jsonl").read_bytes()
    lines = data.split(b"\n")
    complete, last = lines[:-1], lines[-1]
    assert len(complete) >= 1
    for line in complete:  # every line that was ended is a whole record
        assert isinstance(moa_stream.event_decoder.decode(line), moa_stream.TurnTrace)
    # a tail without its newline is the line the kill tore: readers skip it (unless it happens to be whole)
    whole_tail = bool(last) and _decodes(last)
    assert len(list(moa_stream.read_traces(tmp_path / "crash.jsonl"))) == len(complete) + whole_tail


def _decodes(line: bytes) -> bool:
    try:
        moa_stream.event_decoder.decode(line)
    except msgspec.DecodeError:
        return False
    return True


async def test_a_full_disk_fails_the_trace_sink_only_and_is_counted(
    upstream: openai.AsyncOpenAI, tmp_path: Path, log: EventLog
) -> None:
    (tmp_path / "full.jsonl").symlink_to("/dev/full")  # every write to it fails with ENOSPC
    client = moa_stream.wrap(upstream, trace_dir=tmp_path, sinks=[log])
    with moa_stream.session("full"):
        for _ in range(2):
            reply = await client.chat.completions.create(model="sim-small", messages=USER)
            assert reply.choices[0].message.content  # the caller never notices
    await client.close()
    stats = {s.name: s for s in moa_stream.sink_stats(client)}
    assert (stats["trace_writer"].failed, stats["trace_writer"].delivered) == (2, 0)  # one trace record per turn
    assert len(log.of(moa_stream.TurnTrace)) == 2  # other sinks still get the records


async def test_a_trace_dir_removed_under_the_writer_fails_and_recovers(
    upstream: openai.AsyncOpenAI, tmp_path: Path
) -> None:
    traces = tmp_path / "traces"
    client = moa_stream.wrap(upstream, trace_dir=traces)
    with moa_stream.session("s"):
        traces.rmdir()
        traces.write_text("not a directory any more")
        await client.chat.completions.create(model="sim-small", messages=USER)
        assert await moa_stream.flush(client)
        traces.unlink()
        traces.mkdir()
        await client.chat.completions.create(model="sim-large", messages=USER)
    await client.close()
    writer = {s.name: s for s in moa_stream.sink_stats(client)}["trace_writer"]
    assert (writer.failed, writer.delivered) == (1, 1)
    assert [t.model for t in moa_stream.read_traces(traces / "s.jsonl")] == ["sim-large"]


PARTIAL_WRITER = """
import asyncio, json, os, resource, signal, sys
from moa_stream import event_decoder
from moa_stream._traces import TraceWriter

# Reuse one record shape; only the session-file size limit changes between batches.
record = event_decoder.decode(open(sys.argv[2], "rb").read())

async def main():
    writer = TraceWriter(sys.argv[1])
    await writer.write_batch([record])
    size = os.path.getsize(writer.path_for(record.session_id))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + size // 2, hard))  # room for half a line
    try:
        await writer.write_batch([record, record])
        error = None
    except OSError as exc:
        error = exc.errno
    after_failure = os.path.getsize(writer.path_for(record.session_id))
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    await writer.write_batch([record])
    await writer.aclose()
    print(json.dumps({"size": size, "error": error, "after_failure": after_failure}))

asyncio.run(main())
"""


def test_a_write_that_fills_the_disk_takes_its_partial_line_back(tmp_path: Path) -> None:
    import errno
    import json
    import subprocess
    import sys

    record = tmp_path / "record.json"
    record.write_bytes(moa_stream.event_encoder.encode(trace_record()))
    run = subprocess.run(
        [sys.executable, "-c", PARTIAL_WRITER, str(tmp_path / "traces"), str(record)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["error"] == errno.EFBIG
    assert result["after_failure"] == result["size"]  # the half-written line was taken back
    assert len(list(moa_stream.read_traces(tmp_path / "traces" / "s.jsonl"))) == 2
