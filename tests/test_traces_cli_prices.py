"""`moa-stream traces stats --prices FILE`: the recorded usage re-priced under another price table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

import moa_stream

from . import test_traces_cli as shared
from .test_traces_cli import direct_turn, json_of, moa_turn, traces, usd

# The fixtures of test_traces_cli.py: the simulator's models and presets, traces in tmp_path.
sim, server, trace_dir, client, wide_terminal = (
    shared.sim,
    shared.server,
    shared.trace_dir,
    shared.client,
    shared.wide_terminal,
)

# Recorded under test_traces_cli.PRICES. Here m1 costs twice as much, m2 the same, m3 has no price,
# and m-free (unpriced when recorded) gets one.
WHAT_IF: dict[str, Any] = {
    "m1": {"input_cost_per_token": 2e-6, "output_cost_per_token": 4e-6, "litellm_provider": "openai"},
    "m2": {"input_cost_per_token": 2e-6, "output_cost_per_token": 4e-6},
    "m-free": {"input_cost_per_token": 1e-7, "output_cost_per_token": 1e-7},
    "an-image-model": {"output_cost_per_image": 0.04},  # no per-token prices: LiteLLM entries we skip
    "sample_spec": "a LiteLLM file's annotations are not prices",
}


@pytest.fixture
def price_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(WHAT_IF))
    return path


async def duo_and_free(client: openai.AsyncOpenAI, trace_dir: Path) -> dict[str, list[moa_stream.CallUsage]]:
    """A MoA turn (m1, m2, then m3) and a direct turn of m-free; each model's recorded usages."""
    with moa_stream.session("alice"):
        await moa_turn(client, "duo")
        await direct_turn(client, "m-free")
    await moa_stream.flush(client)
    by_model: dict[str, list[moa_stream.CallUsage]] = {}
    for record in moa_stream.read_traces(trace_dir / "alice.jsonl"):
        for call in record.calls:
            by_model.setdefault(call.usage.model, []).append(call.usage)
    return by_model


def what_if(usages: list[moa_stream.CallUsage]) -> float:
    table = moa_stream.PriceTable().updated({m: p for m, p in WHAT_IF.items() if m in ("m1", "m2", "m-free")})
    return sum(table.cost(u.model, input_tokens=u.input_tokens, output_tokens=u.output_tokens) or 0 for u in usages)


def recorded(usages: list[moa_stream.CallUsage]) -> float:
    return sum(u.cost_usd or 0 for u in usages)


def rows(out: str, table: str) -> dict[str, list[str]]:
    section = out.split("what-if prices: ")[1].split(f"by {table} ")[1].split("\n\n")[0]
    return {line.split()[0]: line.split()[1:] for line in section.splitlines()[1:]}


async def test_prices_shows_recorded_and_what_if_cost_per_model_and_in_total(
    client: openai.AsyncOpenAI, trace_dir: Path, price_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    usages = await duo_and_free(client, trace_dir)
    m1, m2, m3, free = usages["m1"], usages["m2"], usages["m3"], usages["m-free"]

    assert traces("stats", trace_dir, "--prices", price_file) == 0
    out = capsys.readouterr().out
    assert f"what-if prices: {price_file} (3 models priced)" in out
    by_model = rows(out, "model")
    assert by_model["m1"] == ["1", usd(recorded(m1)), usd(what_if(m1)), "+100.0%"]
    assert by_model["m2"] == ["1", usd(recorded(m2)), usd(what_if(m2)), "+0.0%"]
    assert by_model["m3"] == ["1", usd(recorded(m3)), "unpriced", "-"]  # not $0
    assert by_model["m-free"] == ["1", "unknown", usd(what_if(free)), "-"]
    everything = [*m1, *m2, *m3, *free]
    total = ["4", usd(recorded(everything)) + "+", usd(what_if(everything)) + "+", "-"]
    assert by_model["total"] == total
    by_request = rows(out, "requested model")
    assert by_request["moa:duo"] == ["3", usd(recorded([*m1, *m2, *m3])), usd(what_if([*m1, *m2])) + "+", "-"]
    assert by_request["total"] == total
    assert f"unpriced: {price_file} has no price for m3 (1 call, left out of the what-if" in out


async def test_prices_json_has_the_what_if_beside_the_recorded_cost(
    client: openai.AsyncOpenAI, trace_dir: Path, price_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    usages = await duo_and_free(client, trace_dir)
    assert traces("stats", trace_dir, "--prices", price_file, "--json") == 0
    prices = json_of(capsys)["prices"]
    assert list(prices) == ["file", "models_priced", "total", "by_model", "by_requested_model"]
    assert (prices["file"], prices["models_priced"]) == (str(price_file), 3)
    by_model = {row.pop("name"): row for row in prices["by_model"]}
    assert by_model["m1"] == {
        "calls": 1,
        "recorded_cost_usd": pytest.approx(recorded(usages["m1"])),
        "recorded_cost_unknown_calls": 0,
        "whatif_cost_usd": pytest.approx(what_if(usages["m1"])),
        "unpriced_calls": 0,
        "usage_missing_calls": 0,
        "whatif_complete": True,
        "change_pct": pytest.approx(100.0),
    }
    assert (by_model["m3"]["whatif_cost_usd"], by_model["m3"]["unpriced_calls"]) == (None, 1)
    assert by_model["m-free"]["recorded_cost_unknown_calls"] == 1
    total = prices["total"]
    assert (total["calls"], total["unpriced_calls"], total["whatif_complete"], total["change_pct"]) == (
        4,
        1,
        False,
        None,
    )
    assert total["whatif_cost_usd"] == pytest.approx(what_if([u for us in usages.values() for u in us]))


async def test_prices_leaves_calls_without_usage_out_of_the_what_if(
    client: openai.AsyncOpenAI, trace_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with moa_stream.session("lossy"):
        await moa_turn(client, "lossy")  # m-fail's call failed before any usage
    await moa_stream.flush(client)
    prices = tmp_path / "all.json"
    prices.write_text(json.dumps({m: WHAT_IF["m1"] for m in ("m1", "m3", "m-fail")}))
    assert traces("stats", trace_dir, "--prices", prices) == 0
    out = capsys.readouterr().out
    assert rows(out, "model")["m-fail"][2] == "unknown"
    assert "no usage recorded for 1 call: not re-priced" in out


def test_prices_from_a_missing_or_broken_file_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.jsonl").write_bytes(b"")
    assert traces("stats", tmp_path, "--prices", tmp_path / "nope.json") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot read price file" in captured.err
    (tmp_path / "bad.json").write_text("{not json")
    assert traces("stats", tmp_path, "--prices", tmp_path / "bad.json") == 1
    assert "not valid JSON" in capsys.readouterr().err
