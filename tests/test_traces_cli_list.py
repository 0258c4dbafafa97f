"""`moa-stream traces list`: one row per turn of a file or a directory, filters, and `--json`."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import msgspec
import openai
import pytest

import moa_stream

from . import test_traces_cli as shared
from .test_traces_cli import TOOLS, USER, direct_turn, json_of, moa_turn, refused_turn, rewrite, started, traces

# The fixtures of test_traces_cli.py: the simulator's models and presets, traces in tmp_path.
sim, server, trace_dir, client, refusing, wide_terminal = (
    shared.sim,
    shared.server,
    shared.trace_dir,
    shared.client,
    shared.refusing,
    shared.wide_terminal,
)

JAN_2 = datetime.datetime(2025, 1, 2, tzinfo=datetime.UTC).timestamp()


def rows(out: str) -> list[list[str]]:
    """The table's rows, split on whitespace, without the header and the footer."""
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[:4] == ["turn", "started", "(UTC)", "session"]
    return [line.split() for line in table[1:]]


async def test_list_has_one_row_per_turn_of_every_file_oldest_first(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await moa_turn(client, "duo")
        await direct_turn(client, "m1")
    with moa_stream.session("bob"):
        await direct_turn(client, "m2")
    await moa_stream.flush(client)
    # File order is not time order (concurrent turns are written as they end): alice's second turn
    # started first, then bob's, then alice's first.
    rewrite(trace_dir / "alice.jsonl", lambda i, r: started(r, JAN_2 + (300 if i == 0 else 100)))
    rewrite(trace_dir / "bob.jsonl", lambda i, r: started(r, JAN_2 + 200))
    moa, direct = moa_stream.read_traces(trace_dir / "alice.jsonl")
    [bob] = moa_stream.read_traces(trace_dir / "bob.jsonl")

    assert traces("list", trace_dir) == 0
    out = capsys.readouterr().out
    listed = rows(out)
    assert [row[0] for row in listed] == [direct.turn_id[:12], bob.turn_id[:12], moa.turn_id[:12]]
    assert listed[0][1:] == [
        "2025-01-02",
        "00:01:40",
        "alice",
        "m1",
        "completed",
        "1",
        f"{direct.end.input_tokens:,}",
        f"{direct.end.output_tokens:,}",
        f"${direct.end.cost_usd:.6f}",
        f"{direct.end.duration_s:.3f}s",
    ]
    assert listed[2][3:7] == ["alice", "moa:duo", "completed", "3"]
    assert f"${moa.end.cost_usd:.6f}" in listed[2]
    assert "3 turns in 2 files, oldest first" in out


async def test_list_reads_one_file(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await direct_turn(client, "m1")
    with moa_stream.session("bob"):
        await direct_turn(client, "m2")
    await moa_stream.flush(client)
    [turn] = moa_stream.read_traces(trace_dir / "bob.jsonl")
    assert traces("list", trace_dir / "bob.jsonl") == 0
    out = capsys.readouterr().out
    assert [row[0] for row in rows(out)] == [turn.turn_id[:12]]
    assert "1 turn, oldest first" in out


async def test_list_shows_a_refused_turn_as_refused_with_its_reason(
    refusing: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the reason is cut to the terminal's width (never to less than 30)
    with moa_stream.session("alice"):
        await direct_turn(refusing, "m1")
        await refused_turn(refusing, "m2")
    await moa_stream.flush(refusing)
    _, refused = moa_stream.read_traces(trace_dir / "alice.jsonl")
    assert refused.end.error
    assert traces("list", trace_dir) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith(refused.turn_id[:12])]
    assert line.split()[3:6] == ["alice", "m2", "refused"]
    assert line.split()[6:9] == ["0", "0", "0"]  # calls, input, output
    assert line.endswith(refused.end.error)
    assert "2 turns (1 refused) in 1 file" in out
    monkeypatch.setenv("COLUMNS", "100")
    assert traces("list", trace_dir) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith(refused.turn_id[:12])]
    assert line.endswith("\N{HORIZONTAL ELLIPSIS}")
    assert refused.end.error.startswith(line.split("  ")[-1][:-1])


async def test_list_session_filter_keeps_that_sessions_turns(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for session in ("alice", "bob", "carol"):
        with moa_stream.session(session):
            await direct_turn(client, "m1")
    await moa_stream.flush(client)
    assert traces("list", trace_dir, "--session", "bob", "--session", "carol") == 0
    out = capsys.readouterr().out
    assert sorted(row[3] for row in rows(out)) == ["bob", "carol"]
    assert "2 turns in 3 files (of 3 read)" in out


async def test_list_since_takes_an_iso_time_in_utc_or_a_time_ago(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        for model in ("m1", "m2", "m3"):
            await direct_turn(client, model)
    await moa_stream.flush(client)
    an_hour_ago = time.time() - 3600
    rewrite(trace_dir / "alice.jsonl", lambda i, r: started(r, (JAN_2 - 60, JAN_2 + 60, an_hour_ago)[i]))

    def models(*since: str) -> list[str]:
        assert traces("list", trace_dir, "--since", *since) == 0
        out = capsys.readouterr().out
        return [row[4] for row in rows(out)] if out.startswith("turn") else []

    assert models("2025-01-02") == ["m2", "m3"]  # a date: midnight UTC
    assert models("2025-01-02T00:00:30") == ["m2", "m3"]  # no offset: UTC, as the list shows times
    assert models("2025-01-02T01:00:30+01:00") == ["m2", "m3"]
    assert models("2025-01-01T23:58Z") == ["m1", "m2", "m3"]
    assert models("2h") == ["m3"]
    assert models("30m") == []


async def test_list_says_when_no_turn_passes_the_filters(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await direct_turn(client, "m1")
    await moa_stream.flush(client)
    assert traces("list", trace_dir, "--session", "nobody") == 0
    assert capsys.readouterr().out == f"{trace_dir}: 1 turn, none matching --session nobody\n"
    assert traces("list", trace_dir, "--session", "nobody", "--json") == 0
    assert json_of(capsys)["turns"] == []


def test_list_refuses_a_since_it_cannot_read(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        traces("list", ".", "--since", "yesterday")
    assert exit.value.code == 2
    assert "expected an ISO date or time" in capsys.readouterr().err


async def test_list_json_is_one_document_with_a_row_per_turn(
    refusing: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await direct_turn(refusing, "m1")
        await refused_turn(refusing, "moa:duo")
    await moa_stream.flush(refusing)
    done, refused = moa_stream.read_traces(trace_dir / "alice.jsonl")

    assert traces("list", trace_dir, "--json") == 0
    document = json_of(capsys)
    assert {k: document[k] for k in ("command", "source", "files", "skipped_files", "filters", "order")} == {
        "command": "list",
        "source": str(trace_dir),
        "files": 1,
        "skipped_files": [],
        "filters": {"since": None, "sessions": None},
        "order": "started_at",
    }
    first, second = document["turns"]
    assert first == {
        "turn_id": done.turn_id,
        "file": str(trace_dir / "alice.jsonl"),
        "session_id": "alice",
        "started_at": done.end.started_at,
        "started": datetime.datetime.fromtimestamp(done.end.started_at, datetime.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "model": "m1",
        "preset": None,
        "status": "completed",
        "refused": False,
        "error": None,
        "calls": 1,
        "failed_calls": 0,
        "input_tokens": done.end.input_tokens,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": done.end.output_tokens,
        "reasoning_tokens": 0,
        "usage_complete": True,
        "cost_usd": done.end.cost_usd,
        "cost_complete": True,
        "ttft_s": None,
        "duration_s": done.end.duration_s,
        "tool_calls": 0,
        "tool_names": [],
    }
    assert second["turn_id"] == refused.turn_id
    assert (second["model"], second["preset"], second["status"]) == ("moa:duo", "duo", "error")
    assert (second["refused"], second["calls"]) == (True, 0)
    assert second["error"] == refused.end.error
    assert "budget exceeded" in second["error"]


async def test_list_json_counts_tool_calls_and_cache_writes(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("tools"):
        await client.chat.completions.create(model="m1", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
        await direct_turn(client, "m2")
    await moa_stream.flush(client)

    def cache_writes(index: int, record: moa_stream.TurnTrace) -> moa_stream.TurnTrace:
        # No simulator model bills cache writes: the second turn's call wrote 5 tokens to the cache.
        if index == 0:
            return record
        [call] = record.calls
        usage = msgspec.structs.replace(call.usage, cache_write_tokens=5)
        return msgspec.structs.replace(record, calls=[msgspec.structs.replace(call, usage=usage)])

    rewrite(trace_dir / "tools.jsonl", cache_writes)
    assert traces("list", trace_dir, "--json") == 0
    tooled, cached = json_of(capsys)["turns"]
    assert (tooled["tool_calls"], tooled["tool_names"]) == (1, ["lookup"])
    assert (cached["tool_calls"], cached["tool_names"], cached["cache_write_tokens"]) == (0, [], 5)


async def test_list_of_a_directory_with_an_unreadable_file_lists_the_rest_and_exits_1(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await direct_turn(client, "m1")
    await moa_stream.flush(client)
    broken = trace_dir / "broken.jsonl"
    broken.write_bytes(b"not json\n" + (trace_dir / "alice.jsonl").read_bytes())
    assert traces("list", trace_dir) == 1
    captured = capsys.readouterr()
    assert f"{broken}:1: not a trace record" in captured.err
    assert len(rows(captured.out)) == 1
    assert traces("list", trace_dir, "--json") == 1
    document = json_of(capsys)
    assert [entry["file"] for entry in document["skipped_files"]] == [str(broken)]
    assert len(document["turns"]) == 1


def test_list_parser_is_wired_into_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moa_stream._cli import main

    assert main(["traces", "list", str(tmp_path / "nope.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err
