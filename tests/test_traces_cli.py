"""`moa-stream traces show|stats` on trace files written by real turns on the simulator.

The fixtures and helpers here are shared by `test_traces_cli_*.py`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest

import moa_stream
from moa_stream import Preset
from moa_stream._cli._traces import add_traces_parser, run_traces
from moa_stream.testing import Fault, SimModel, Simulator

USER = [{"role": "user", "content": "Compare two rivers"}]
PRICES = {
    "m1": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
    "m2": {"input_cost_per_token": 2e-6, "output_cost_per_token": 4e-6},
    "m3": {"input_cost_per_token": 3e-6, "output_cost_per_token": 6e-6},
}
Wrapped = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
def sim() -> Simulator:
    return Simulator(
        [
            SimModel(name="m1"),
            SimModel(name="m2", reply_tokens=200),
            SimModel(name="m3"),
            SimModel(name="m-free"),  # no price: its cost is unknown
            SimModel(name="m-fail", fault=Fault(kind="http_500")),
        ]
    )


@pytest.fixture
def server() -> None:
    """The in-process simulator only: the commands read files, the transport does not matter here."""
    return None


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    return tmp_path / "traces"


@pytest.fixture
def client(wrapped: Wrapped, trace_dir: Path) -> openai.AsyncOpenAI:
    presets = {
        "duo": Preset(references=["m1", "m2"], aggregator="m3"),
        "lossy": Preset(references=["m1", "m-fail"], aggregator="m3"),
    }
    return wrapped(presets=presets, prices=PRICES, trace_dir=trace_dir)


async def moa_turn(client: openai.AsyncOpenAI, preset: str) -> None:
    stream = await client.chat.completions.create(model=f"moa:{preset}", messages=USER, stream=True)  # type: ignore[arg-type]
    async for _ in stream:
        pass


async def direct_turn(client: openai.AsyncOpenAI, model: str) -> None:
    await client.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]


def traces(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="moa-stream")
    add_traces_parser(parser.add_subparsers(dest="command", required=True))
    return run_traces(parser.parse_args(["traces", *map(str, argv)]))


def usd(value: float) -> str:
    return f"${value:.6f}"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")


# -- show ---------------------------------------------------------------------------------------


async def test_show_prints_the_last_turn_with_references_side_by_side(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await direct_turn(client, "m1")
        await moa_turn(client, "duo")
    await moa_stream.flush(client)
    file = trace_dir / "alice.jsonl"
    _, turn = moa_stream.read_traces(file)

    assert traces("show", file) == 0
    out = capsys.readouterr().out
    assert f"turn     {turn.turn_id}" in out
    assert "session  alice" in out
    assert "moa:duo  (preset duo, references run: cadence miss)" in out
    assert f"input {turn.end.input_tokens:,}" in out
    assert f"output {turn.end.output_tokens:,}" in out
    assert f"cost     {usd(turn.end.cost_usd)}" in out
    m1, m2 = (c for c in turn.calls if c.role == "reference")
    [aggregator] = (c for c in turn.calls if c.role == "aggregator")
    lines = out.splitlines()
    # One row per fact, the references' cells on the same row.
    assert any(line.startswith("m1 ") and " | m2" in line for line in lines)
    for row in (
        f"in {m1.usage.input_tokens} / out {m1.usage.output_tokens}",
        usd(m1.usage.cost_usd or 0),
        f"ttft {m1.usage.ttft_s:.3f}s",
        f"took {m1.usage.duration_s:.3f}s",
    ):
        [line] = [line for line in lines if line.startswith(row)]
        assert " | " in line
    assert any(line.startswith("completed ") and line.endswith("| completed") for line in lines)
    # The first words of each answer, wrapped to the column; the aggregator's answer in full.
    assert any(line.startswith(" ".join(m1.output.text.split()[:2])) for line in lines)
    assert any(f"| {' '.join(m2.output.text.split()[:2])}" in line for line in lines)
    assert "more line" in out  # m2 said more than the column shows
    assert " ".join(aggregator.output.text.split()) in " ".join(out.split("-- aggregator")[1].split()[1:])


async def test_show_stacks_references_when_the_terminal_is_too_narrow(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "45")
    with moa_stream.session("narrow"):
        await moa_turn(client, "duo")
    await moa_stream.flush(client)
    assert traces("show", trace_dir / "narrow.jsonl") == 0
    out = capsys.readouterr().out
    assert " | " not in out
    assert "[1] m1" in out
    assert "[2] m2" in out
    assert max(len(line) for line in out.splitlines()) <= 45


async def test_show_marks_a_failed_reference_and_unknown_usage(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("lossy"):
        await moa_turn(client, "lossy")
    await moa_stream.flush(client)
    assert traces("show", trace_dir / "lossy.jsonl") == 0
    out = capsys.readouterr().out
    assert "(3 calls, 1 failed)" in out
    assert "[lower bound: usage missing for 1 call]" in out
    assert "| error (HTTP 500)" in out
    assert "| in ? / out ?" in out
    assert "| [error] HTTP 500" in out


async def test_show_prints_the_single_call_of_a_direct_turn(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("solo"):
        await direct_turn(client, "m-free")
    await moa_stream.flush(client)
    [turn] = moa_stream.read_traces(trace_dir / "solo.jsonl")
    assert traces("show", trace_dir / "solo.jsonl") == 0
    out = capsys.readouterr().out
    assert "-- call m-free " in out
    assert "references" not in out
    assert "cost unknown" in out
    assert "[lower bound: no known price for 1 call]" in out
    assert " ".join(turn.calls[0].output.text.split()) in " ".join(out.split())


async def test_turn_prefix_selects_that_turn(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("two"):
        await direct_turn(client, "m1")
        await direct_turn(client, "m2")
    await moa_stream.flush(client)
    first, second = moa_stream.read_traces(trace_dir / "two.jsonl")
    prefix = next(first.turn_id[:n] for n in range(1, 33) if not second.turn_id.startswith(first.turn_id[:n]))
    assert traces("show", trace_dir / "two.jsonl", "--turn", prefix) == 0
    out = capsys.readouterr().out
    assert f"turn     {first.turn_id}" in out
    assert "-- call m1 " in out


async def test_turn_prefix_that_matches_nothing_is_bad_input(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("two"):
        await direct_turn(client, "m1")
    await moa_stream.flush(client)
    assert traces("show", trace_dir / "two.jsonl", "--turn", "not-hex") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no turn id starts with 'not-hex' (1 turn" in captured.err


async def test_turn_prefix_that_matches_two_turns_is_bad_input(
    client: openai.AsyncOpenAI, trace_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("two"):
        await direct_turn(client, "m1")
        await direct_turn(client, "m2")
    await moa_stream.flush(client)
    records = list(moa_stream.read_traces(trace_dir / "two.jsonl"))
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_bytes(
        b"".join(
            moa_stream.event_encoder.encode(msgspec.structs.replace(record, turn_id=f"abc{index}")) + b"\n"
            for index, record in enumerate(records)
        )
    )
    assert traces("show", renamed, "--turn", "ab") == 1
    err = capsys.readouterr().err
    assert "'ab' matches 2 turns (abc0, abc1)" in err
    assert traces("show", renamed, "--turn", "abc1") == 0


async def test_torn_last_line_is_skipped_and_mentioned(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("torn"):
        await direct_turn(client, "m1")
        await direct_turn(client, "m2")
    await moa_stream.flush(client)
    file = trace_dir / "torn.jsonl"
    first, second = moa_stream.read_traces(file)
    with file.open("ab") as handle:
        handle.write(moa_stream.event_encoder.encode(first)[:40])  # a crash in the middle of a write
    assert traces("show", file) == 0
    captured = capsys.readouterr()
    assert f"{file}:3: incomplete last line skipped" in captured.err
    assert f"turn     {second.turn_id}" in captured.out


def test_missing_file_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert traces("show", tmp_path / "nope.jsonl") == 1
    assert f"{tmp_path / 'nope.jsonl'}: cannot read: No such file or directory" in capsys.readouterr().err


def test_file_without_turns_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert traces("show", tmp_path / "empty.jsonl") == 1
    assert "no turns in this file" in capsys.readouterr().err


async def test_a_bad_line_in_the_middle_is_bad_input_naming_file_and_line(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("bad"):
        await direct_turn(client, "m1")
    await moa_stream.flush(client)
    file = trace_dir / "bad.jsonl"
    good = file.read_bytes()
    file.write_bytes(b"{garbage\n" + good)
    assert traces("show", file) == 1
    assert f"{file}:1: not a trace record" in capsys.readouterr().err


# -- stats --------------------------------------------------------------------------------------


def table_row(out: str, table: str, name: str) -> list[str]:
    section = out.split(f"by {table} ")[1].split("\n\n")[0]
    [row] = [line.split() for line in section.splitlines() if line.split()[0] == name]
    return row


async def test_stats_totals_cost_and_tokens_by_model_and_by_session(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await moa_turn(client, "duo")
        await direct_turn(client, "m1")
    with moa_stream.session("bob"):
        await direct_turn(client, "m-free")
    await moa_stream.flush(client)
    records = [*moa_stream.read_traces(trace_dir / "alice.jsonl"), *moa_stream.read_traces(trace_dir / "bob.jsonl")]
    usages = [call.usage for record in records for call in record.calls]
    known_cost = sum(u.cost_usd for u in usages if u.cost_usd is not None)

    assert traces("stats", trace_dir) == 0
    out = capsys.readouterr().out
    assert f"{trace_dir}: 2 files, 3 turns, 5 calls" in out
    assert f"cost     {usd(known_cost)}  (lower bound: no known price for 1 call)" in out
    total_in = sum(u.input_tokens or 0 for u in usages)
    total_out = sum(u.output_tokens or 0 for u in usages)
    assert f"tokens   input {total_in:,} (cached 0)  output {total_out:,} (reasoning 0)" in out

    m1 = [u for u in usages if u.model == "m1"]
    assert table_row(out, "model", "m1") == [
        "m1",
        "2",  # turns: the MoA turn and the direct one
        "0",  # refused
        "2",  # calls
        "0",  # failed
        f"{sum(u.input_tokens or 0 for u in m1):,}",
        "0",
        "-",  # cache writes: the simulator reports none
        f"{sum(u.output_tokens or 0 for u in m1):,}",
        "0",
        "0",  # tool calls
        usd(sum(u.cost_usd or 0 for u in m1)),
    ]
    assert table_row(out, "model", "m-free")[-1] == "unknown"
    alice = [u for u in usages if u.session_id == "alice"]
    assert table_row(out, "session", "alice")[1:5] == ["2", "0", "4", "0"]
    assert table_row(out, "session", "alice")[-1] == usd(sum(u.cost_usd or 0 for u in alice))
    assert table_row(out, "session", "bob")[1:5] == ["1", "0", "1", "0"]
    assert table_row(out, "requested model", "moa:duo")[1:5] == ["1", "0", "3", "0"]


async def test_stats_reports_an_unreadable_file_and_totals_the_rest(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await direct_turn(client, "m1")
    await moa_stream.flush(client)
    broken = trace_dir / "broken.jsonl"
    broken.write_bytes(b"not json\n" + (trace_dir / "alice.jsonl").read_bytes())
    assert traces("stats", trace_dir) == 1
    captured = capsys.readouterr()
    assert f"{broken}:1: not a trace record" in captured.err
    assert "(file skipped)" in captured.err
    assert f"{trace_dir}: 1 file (1 unreadable, skipped), 1 turn, 1 call" in captured.out


async def test_stats_mentions_a_torn_last_line_but_succeeds(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await direct_turn(client, "m1")
    await moa_stream.flush(client)
    with (trace_dir / "alice.jsonl").open("ab") as handle:
        handle.write(b'{"type":"turn_trace","turn_id":"x')
    assert traces("stats", trace_dir) == 0
    captured = capsys.readouterr()
    assert f"{trace_dir / 'alice.jsonl'}:2: incomplete last line skipped" in captured.err
    assert "1 turn, 1 call" in captured.out


def test_stats_of_a_missing_or_empty_directory_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert traces("stats", tmp_path / "nope") == 1
    assert f"{tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
    assert traces("stats", tmp_path) == 1
    assert f"{tmp_path}: no *.jsonl trace files" in capsys.readouterr().err


# -- shared by test_traces_cli_*.py -------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"river": {"type": "string"}}}},
    }
]


@pytest.fixture
def refusing(wrapped: Wrapped, trace_dir: Path) -> openai.AsyncOpenAI:
    """A client whose sessions may start one call each: a session's second turn is refused."""
    presets = {"duo": Preset(references=["m1", "m2"], aggregator="m3")}
    budget = moa_stream.Budget(session=moa_stream.Limits(calls=1))
    return wrapped(presets=presets, prices=PRICES, trace_dir=trace_dir, budget=budget)


async def refused_turn(client: openai.AsyncOpenAI, model: str) -> None:
    with pytest.raises(moa_stream.BudgetExceeded):
        await direct_turn(client, model)


def rewrite(file: Path, change: Callable[[int, moa_stream.TurnTrace], moa_stream.TurnTrace]) -> None:
    """Replace each record of `file` by `change(index, record)`: facts the simulator cannot produce."""
    records = list(moa_stream.read_traces(file))
    file.write_bytes(b"".join(moa_stream.event_encoder.encode(change(i, r)) + b"\n" for i, r in enumerate(records)))


def started(record: moa_stream.TurnTrace, at: float) -> moa_stream.TurnTrace:
    return msgspec.structs.replace(record, end=msgspec.structs.replace(record.end, started_at=at))


def json_of(capsys: pytest.CaptureFixture[str]) -> Any:
    """The one JSON document a `--json` command printed."""
    return json.loads(capsys.readouterr().out)
