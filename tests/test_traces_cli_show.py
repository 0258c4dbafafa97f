"""`moa-stream traces show` of a directory (`--turn`, `--last`), the reason of a failed or refused turn,
and `--json`."""

from __future__ import annotations

from pathlib import Path

import msgspec
import openai
import pytest

import moa_stream

from . import test_traces_cli as shared
from .test_traces_cli import direct_turn, json_of, moa_turn, refused_turn, rewrite, started, traces

# The fixtures of test_traces_cli.py: the simulator's models and presets, traces in tmp_path.
sim, server, trace_dir, client, refusing, wide_terminal = (
    shared.sim,
    shared.server,
    shared.trace_dir,
    shared.client,
    shared.refusing,
    shared.wide_terminal,
)


async def two_sessions(client: openai.AsyncOpenAI, trace_dir: Path) -> list[moa_stream.TurnTrace]:
    """alice's two turns and bob's one; bob's started between alice's (file order is not time order)."""
    with moa_stream.session("alice"):
        await direct_turn(client, "m1")
        await moa_turn(client, "duo")
    with moa_stream.session("bob"):
        await direct_turn(client, "m2")
    await moa_stream.flush(client)
    rewrite(trace_dir / "alice.jsonl", lambda i, r: started(r, 1_000.0 + 200 * i))
    rewrite(trace_dir / "bob.jsonl", lambda i, r: started(r, 1_100.0))
    return [*moa_stream.read_traces(trace_dir / "alice.jsonl"), *moa_stream.read_traces(trace_dir / "bob.jsonl")]


async def test_show_last_of_a_directory_is_the_turn_that_started_last(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, moa, _ = await two_sessions(client, trace_dir)
    assert traces("show", trace_dir, "--last") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"file     {trace_dir / 'alice.jsonl'}\n")
    assert f"turn     {moa.turn_id}" in out
    assert traces("show", trace_dir) == 0  # --last is the default
    assert f"turn     {moa.turn_id}" in capsys.readouterr().out


async def test_show_last_with_a_session_filter_is_that_sessions_last_turn(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, bob = await two_sessions(client, trace_dir)
    assert traces("show", trace_dir, "--last", "--session", "bob") == 0
    assert f"turn     {bob.turn_id}" in capsys.readouterr().out


async def test_show_turn_finds_a_turn_in_any_file_of_a_directory(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _, bob = await two_sessions(client, trace_dir)
    assert traces("show", trace_dir, "--turn", bob.turn_id[:12]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"file     {trace_dir / 'bob.jsonl'}\n")
    assert f"turn     {bob.turn_id}" in out
    assert traces("show", trace_dir, "--turn", first.turn_id) == 0
    assert f"turn     {first.turn_id}" in capsys.readouterr().out
    assert traces("show", trace_dir, "--turn", "not-hex") == 1
    assert "no turn id starts with 'not-hex' (3 turns in 2 files)" in capsys.readouterr().err


def test_show_takes_turn_or_last_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        traces("show", ".", "--turn", "ab", "--last")
    assert exit.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


async def test_show_prints_why_a_refused_turn_was_refused(
    refusing: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("alice"):
        await direct_turn(refusing, "m1")
        await refused_turn(refusing, "moa:duo")
    await moa_stream.flush(refusing)
    _, refused = moa_stream.read_traces(trace_dir / "alice.jsonl")
    assert refused.end.error

    assert traces("show", trace_dir, "--last") == 0
    out = capsys.readouterr().out
    assert "status   error (refused: no call was sent)  (0 calls)" in out
    assert "model    moa:duo  (preset duo)\n" in out  # not the cadence it would have had: nothing ran
    assert out.endswith("-\nnone ran: the turn was refused\n")
    [reason] = [line for line in out.split("\n") if line.startswith("reason   ")]
    following = out.split(reason)[1].split("\ntokens")[0]  # the reason wraps under itself
    assert " ".join((reason.removeprefix("reason") + following).split()) == refused.end.error


async def test_show_prints_why_a_failed_turn_failed(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("failing"), pytest.raises(openai.InternalServerError):
        await direct_turn(client, "m-fail")
    await moa_stream.flush(client)
    [failed] = moa_stream.read_traces(trace_dir / "failing.jsonl")
    assert failed.end.status == "error"
    assert traces("show", trace_dir / "failing.jsonl") == 0
    out = capsys.readouterr().out
    assert "status   error  (1 call, 1 failed)" in out
    assert "reason   HTTP 500" in out


async def test_show_of_a_completed_turn_has_no_reason(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("fine"):
        await moa_turn(client, "lossy")  # a reference failed, the turn did not
    await moa_stream.flush(client)
    assert traces("show", trace_dir) == 0
    out = capsys.readouterr().out
    assert "status   completed  (3 calls, 1 failed)" in out
    assert "\nreason " not in out


async def test_show_json_is_the_turn_and_its_record(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, moa, _ = await two_sessions(client, trace_dir)
    assert traces("show", trace_dir, "--json") == 0
    document = json_of(capsys)
    assert list(document) == ["command", "source", "files", "skipped_files", "filters", "turn", "trace"]
    assert (document["command"], document["files"]) == ("show", 2)
    turn = document["turn"]
    assert (turn["turn_id"], turn["preset"], turn["calls"]) == (moa.turn_id, "duo", 3)
    assert turn["file"] == str(trace_dir / "alice.jsonl")
    assert msgspec.convert(document["trace"], moa_stream.TurnTrace) == moa


async def test_show_of_a_directory_whose_filters_leave_nothing_is_bad_input(
    client: openai.AsyncOpenAI, trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await two_sessions(client, trace_dir)
    assert traces("show", trace_dir, "--session", "carol") == 1
    assert f"{trace_dir}: 3 turns, none matching --session carol" in capsys.readouterr().err
