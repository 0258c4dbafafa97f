"""`moa-stream traces stats`: tables that add up to the totals (refused turns included), by role, tool
calls and cache writes, filters, and `--json`."""

from __future__ import annotations

from pathlib import Path

import msgspec
import openai
import pytest

import moa_stream

from . import test_traces_cli as shared
from .test_traces_cli import (
    TOOLS,
    USER,
    direct_turn,
    json_of,
    moa_turn,
    refused_turn,
    rewrite,
    started,
    table_row,
    traces,
    usd,
)

# The fixtures of test_traces_cli.py: the simulator's models and presets, traces in tmp_path.
sim, server, trace_dir, client, refusing, wide_terminal = (
    shared.sim,
    shared.server,
    shared.trace_dir,
    shared.client,
    shared.refusing,
    shared.wide_terminal,
)
TABLES = ("by_model", "by_session", "by_requested_model", "by_role")
SUMMED = ("calls", "failed_calls", "input_tokens", "output_tokens", "cache_write_tokens", "tool_calls", "cost_usd")


def rows_of(out: str, table: str) -> list[list[str]]:
    section = out.split(f"by {table} ")[1].split("\n\n")[0]
    return [line.split() for line in section.splitlines()[1:]]


async def mixed_turns(client: openai.AsyncOpenAI, refusing: openai.AsyncOpenAI) -> None:
    """alice: a MoA turn with a failed reference, and a turn that failed; bob: a direct turn, then a MoA
    turn the budget refused; carol: a direct turn, then a direct turn the budget refused."""
    with moa_stream.session("alice"):
        await moa_turn(client, "lossy")
        with pytest.raises(openai.InternalServerError):
            await direct_turn(client, "m-fail")
    with moa_stream.session("bob"):
        await direct_turn(refusing, "m1")
        await refused_turn(refusing, "moa:duo")
    with moa_stream.session("carol"):
        await direct_turn(refusing, "m2")
        await refused_turn(refusing, "m2")
    await moa_stream.flush(client)
    await moa_stream.flush(refusing)


async def test_stats_counts_refused_turns_in_the_totals_and_in_every_table(
    client: openai.AsyncOpenAI, refusing: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await mixed_turns(client, refusing)
    assert traces("stats", trace_dir) == 0
    out = capsys.readouterr().out
    assert f"{trace_dir}: 3 files, 6 turns (2 refused, 1 failed), 6 calls (2 failed)" in out
    # turns, refused: each turn has one session and one requested model, so these columns add up.
    assert {row[0]: row[1:3] for row in rows_of(out, "session")} == {
        "alice": ["2", "0"],
        "bob": ["2", "1"],
        "carol": ["2", "1"],
    }
    requested = {row[0]: row[1:4] for row in rows_of(out, "requested model")}
    assert requested == {
        "moa:lossy": ["1", "0", "3"],
        "m-fail": ["1", "0", "1"],
        "m1": ["1", "0", "1"],
        "moa:duo": ["1", "1", "0"],
        "m2": ["2", "1", "1"],
    }
    # A refused turn has no model and no role: those tables count it in a row of its own.
    assert table_row(out, "model", "(no")[1:5] == ["call)", "2", "2", "0"]
    assert table_row(out, "role", "(no")[1:5] == ["call)", "2", "2", "0"]
    for table in ("model", "session", "requested model", "role"):
        assert sum(int(row[-9]) for row in rows_of(out, table)) == 6, table  # calls, counted from the right
    assert "(no call): turns refused (or ended) before any call was sent" in out


async def test_stats_by_role_splits_calls_tokens_and_cost(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await moa_turn(client, "duo")
        await direct_turn(client, "m1")
    await moa_stream.flush(client)
    calls = [call for record in moa_stream.read_traces(trace_dir / "alice.jsonl") for call in record.calls]

    assert traces("stats", trace_dir) == 0
    out = capsys.readouterr().out
    assert [row[0] for row in rows_of(out, "role")] == ["direct", "reference", "aggregator"]
    for role, turns in (("direct", "1"), ("reference", "1"), ("aggregator", "1")):
        usages = [call.usage for call in calls if call.role == role]
        row = table_row(out, "role", role)
        assert row[1] == turns
        assert row[3] == str(len(usages))
        assert row[5] == f"{sum(u.input_tokens or 0 for u in usages):,}"
        assert row[8] == f"{sum(u.output_tokens or 0 for u in usages):,}"
        assert row[-1] == usd(sum(u.cost_usd or 0 for u in usages))


async def test_stats_json_tables_add_up_to_the_total(
    client: openai.AsyncOpenAI, refusing: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await mixed_turns(client, refusing)
    assert traces("stats", trace_dir, "--json") == 0
    document = json_of(capsys)
    assert list(document) == [
        "command",
        "source",
        "files",
        "skipped_files",
        "filters",
        "total",
        *TABLES,
        "prices",
    ]
    total = document["total"]
    assert list(total) == [
        "turns",
        "refused_turns",
        "failed_turns",
        "calls",
        "failed_calls",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "tool_calls",
        "tool_names",
        "usage_missing_calls",
        "estimated_calls",
        "cost_usd",
        "cost_unknown_calls",
        "cost_complete",
    ]
    assert (total["turns"], total["refused_turns"], total["failed_turns"], total["calls"]) == (6, 2, 1, 6)
    assert document["prices"] is None
    for table in TABLES:
        for key in SUMMED:
            assert sum(row[key] for row in document[table]) == pytest.approx(total[key]), (table, key)
    for table in ("by_session", "by_requested_model"):
        for key in ("turns", "refused_turns", "failed_turns"):
            assert sum(row[key] for row in document[table]) == total[key], (table, key)
    [no_call] = [row for row in document["by_role"] if row["name"] is None]
    assert (no_call["turns"], no_call["refused_turns"], no_call["calls"]) == (2, 2, 0)


async def test_stats_shows_tool_calls_and_cache_writes(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("tools"):
        await client.chat.completions.create(model="m1", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
        await direct_turn(client, "m2")
    await moa_stream.flush(client)

    def cache_writes(index: int, record: moa_stream.TurnTrace) -> moa_stream.TurnTrace:
        # No simulator model bills cache writes: each call wrote 7 tokens to the cache.
        [call] = record.calls
        usage = msgspec.structs.replace(call.usage, cache_write_tokens=7)
        return msgspec.structs.replace(record, calls=[msgspec.structs.replace(call, usage=usage)])

    rewrite(trace_dir / "tools.jsonl", cache_writes)
    assert traces("stats", trace_dir) == 0
    out = capsys.readouterr().out
    assert "tools    1 tool call (lookup 1)" in out
    assert "  cache write 14" in out.split("\n\n")[0]
    m1, m2 = table_row(out, "model", "m1"), table_row(out, "model", "m2")
    assert (m1[7], m1[10]) == ("7", "1")  # cache-write, tool-calls
    assert (m2[7], m2[10]) == ("7", "0")
    assert traces("stats", trace_dir, "--json") == 0
    total = json_of(capsys)["total"]
    assert (total["tool_calls"], total["tool_names"], total["cache_write_tokens"]) == (1, {"lookup": 1}, 14)


async def test_stats_filters_by_session_and_start(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for session in ("alice", "bob"):
        with moa_stream.session(session):
            await direct_turn(client, "m1")
            await direct_turn(client, "m2")
    await moa_stream.flush(client)
    for session in ("alice", "bob"):  # each session's first turn in 2024, its second in 2026
        rewrite(trace_dir / f"{session}.jsonl", lambda i, r: started(r, (1_704_067_200.0, 1_767_225_600.0)[i]))

    assert traces("stats", trace_dir, "--session", "bob") == 0
    out = capsys.readouterr().out
    assert f"{trace_dir}: 2 files, 2 turns, 2 calls" in out
    assert "filters  --session bob (4 turns read)" in out
    assert [row[0] for row in rows_of(out, "session")] == ["bob"]

    assert traces("stats", trace_dir, "--since", "2025-01-01", "--json") == 0
    document = json_of(capsys)
    assert document["filters"] == {"since": "2025-01-01T00:00:00Z", "sessions": None}
    assert (document["total"]["turns"], document["total"]["calls"]) == (2, 2)
    assert [row["name"] for row in document["by_requested_model"]] == ["m2"]


def test_stats_json_of_a_directory_without_traces_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert traces("stats", tmp_path, "--json") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{tmp_path}: no *.jsonl trace files" in captured.err
