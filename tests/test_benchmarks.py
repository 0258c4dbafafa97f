"""The benchmark suite works: sections return well-formed results, checks catch what they should,
output is written, and `moa-stream bench` runs. Functional only: no figure is judged here."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import calls, chunks, concurrency, fanout, responses, sinks, store, suite
from benchmarks._common import (
    RESULTS_DIR,
    Config,
    EventKey,
    SectionResult,
    SimProcess,
    check_turn_events,
    format_table,
    has_fast_mode,
    markdown_table,
    percentile,
    rotated,
    write_json,
)
from moa_stream._cli import _main as _cli

TINY = dataclasses.replace(
    Config.quick_run(),
    chunk_sizes=(10,),
    chunk_rounds=2,
    chunk_target=20,
    sink_sizes=(10,),
    sink_rounds=1,
    stream_levels=(1, 3),
    moa_levels=(2,),
    concurrency_streams=4,
    concurrency_rounds=1,
    fanout_levels=(1,),
    fanout_turns=3,
    call_levels=(1, 2),
    call_rounds=2,
    calls_per_sample=3,
    moa_turns=1,
)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    models = [model for section in suite.SECTIONS.values() for model in section.models(TINY)]
    with SimProcess(models) as sim:
        yield sim.base_url


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-work")


@pytest.fixture(scope="module")
def results(base_url: str, work_dir: Path) -> dict[str, SectionResult]:
    """Every section run once on the tiny config, shared by the tests that read the results."""
    return {name: asyncio.run(section.run(base_url, TINY, work_dir / name)) for name, section in suite.SECTIONS.items()}


def _well_formed(result: SectionResult) -> None:
    assert result.rows
    assert all(len(row) == len(result.headers) for row in result.rows)
    json.dumps(result.results)  # machine-readable as it is


def test_chunks_section_compares_every_variant_at_every_size(results: dict[str, SectionResult]) -> None:
    result = results[chunks.NAME]
    _well_formed(result)
    expected = ["floor", "bare", "wrapped", *(["fast"] if has_fast_mode() else []), "moa"]
    assert list(result.results) == ["10"]
    entry = result.results["10"]
    assert list(entry["variants"]) == expected
    for row in entry["variants"].values():
        assert set(row["cpu_us_per_chunk"]) == {"median", "min", "max"}
        assert row["cpu_us_per_chunk"]["min"] <= row["cpu_us_per_chunk"]["median"] <= row["cpu_us_per_chunk"]["max"]
        assert row["chunks_per_sample"] == 20  # two streams of 10 chunks: the caller saw every chunk
        assert row["rounds"] == 2
        assert {"chunks_per_s", "ttft_ms", "added_ttft_ms", "cpu_over_bare", "cpu_over_bare_paired"} <= set(row)
    assert entry["variants"]["bare"]["cpu_over_bare"] == 1.0
    assert "wrapped_over_bare" in entry["ratios"]
    assert ("fast_over_floor" in entry["ratios"]) is has_fast_mode()
    assert any(note.startswith("target wrapped <= 1.02x bare") for note in result.notes)


def test_chunks_section_says_when_fast_mode_is_skipped(
    base_url: str, work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunks, "has_fast_mode", lambda: False)
    config = dataclasses.replace(TINY, chunk_rounds=1, chunk_target=10)
    result = asyncio.run(chunks.run(base_url, config, work_dir / "no-fast"))
    assert "fast" not in result.results["10"]["variants"]
    assert chunks.FAST_SKIPPED in result.notes


def test_sinks_section_compares_off_and_on(results: dict[str, SectionResult]) -> None:
    result = results[sinks.NAME]
    _well_formed(result)
    variants = result.results["10"]["variants"]
    assert {"bare", "wrapped off", "wrapped on"} <= set(variants)
    assert variants["wrapped on"]["on_over_off"] > 0
    assert ("fast on" in variants) is has_fast_mode()


def test_calls_section_measures_every_variant_of_both_workloads_at_every_level(
    results: dict[str, SectionResult],
) -> None:
    result = results[calls.NAME]
    _well_formed(result)
    assert len(result.rows) == len(calls.WORKLOADS) * 2 * len(calls.VARIANTS)
    for workload in calls.WORKLOADS:
        assert list(result.results[workload]) == ["1", "2"]
        for level, variants in result.results[workload].items():
            assert list(variants) == list(calls.VARIANTS)
            assert variants["bare"]["cpu_over_bare"] == variants["bare"]["rate_over_bare"] == 1.0
            for row in variants.values():
                cpu = row["cpu_us_per_call"]
                assert 0 < cpu["min"] <= cpu["median"] <= cpu["max"]
                assert row["calls_per_s"]["median"] > 0
                assert row["calls_per_sample"] == max(3, int(level) * 4)
    moa = result.results["moa"]
    assert moa["turns_per_sample"] == 1
    own, turn = moa["own_cpu_us_per_turn"]["median"], moa["cpu_us_per_turn"]["median"]
    assert own < turn
    assert moa["own_share"]["min"] <= moa["own_share"]["median"] <= moa["own_share"]["max"] < 1
    verdicts = [note for note in result.notes if note.startswith("target")]
    assert len(verdicts) == len(calls.TARGETS) + 2 * 2  # CPU per call, then calls/s per level
    assert all(note.endswith("x)") and (": met (" in note or ": MISSED (" in note) for note in verdicts)
    assert any(note.startswith("MoA turn") for note in result.notes)


def test_store_section_compares_memory_and_redis_in_every_workload(results: dict[str, SectionResult]) -> None:
    result = results[store.NAME]
    _well_formed(result)
    assert len(result.rows) == len(store.WORKLOADS) * len(store.STORES)
    assert result.results["redis_server"]["version"]
    for workload in store.WORKLOADS:
        entry = result.results[workload]
        assert list(entry["stores"]) == list(store.STORES)
        for name, row in entry["stores"].items():
            assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
            cpu = row["cpu_us_per_call"]
            assert 0 < cpu["min"] <= cpu["median"] <= cpu["max"]
            # Tiny sizes: 2 * call_rounds rounds of 2 * calls_per_sample calls, or of moa_turns turns.
            assert (row["rounds"], row["calls_per_sample"]) == (4, 1 if workload == "moa" else 6)
            assert row["calls"] == row["rounds"] * row["calls_per_sample"]
            redis = name.startswith("redis")
            assert (row["server_cpu_us_per_call"] is not None) is redis
            assert (row["server_scripts_per_call"] is not None) is redis
        # Each call reserves its hold, settles it and records its turn: three scripts at least.
        assert entry["stores"]["redis + budget"]["server_scripts_per_call"] >= 3
        assert set(entry["comparisons"]) == set(store.COMPARISONS)
        for compared in entry["comparisons"].values():
            assert {"added_p50_ms", "added_p99_ms", "added_p50_ms_paired", "p50_ratio", "p99_ratio"} <= set(compared)
            assert min(compared["p50_ratio"], compared["p99_ratio"], compared["cpu_ratio"]) > 0
    assert sum(note.startswith("Redis over memory, ") for note in result.notes) == len(store.WORKLOADS)


def test_store_section_says_it_skipped_without_a_redis_server(
    base_url: str, work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "find_redis_server", lambda: None)
    result = asyncio.run(store.run(base_url, TINY, work_dir / "no-redis"))
    assert result.results == {"skipped": store.SKIPPED}
    assert result.rows == []
    assert result.notes[0].startswith(store.SKIPPED)


def test_concurrency_section_reports_every_level_with_exact_events(results: dict[str, SectionResult]) -> None:
    result = results[concurrency.NAME]
    _well_formed(result)
    levels = result.results["levels"]
    kinds = [(row["kind"], row["concurrency"]) for row in levels]
    assert kinds == [("bare", 1), ("streams", 1), ("bare", 3), ("streams", 3), ("moa", 2)]
    for row in levels:
        assert row["errors"] == 0
        assert row["timed_out_rounds"] == 0
        assert row["events_ok"] is (None if row["kind"] == "bare" else True)
        assert row["sink_dropped"] == 0
        assert row["rss_peak_mb"] >= row["rss_before_mb"] > 0
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"]
    [moa_events] = levels[-1]["events"]
    assert moa_events["call_usage"] == 4 * moa_events["turns_expected"]
    assert moa_events["turn_trace"] == moa_events["turns_expected"] == 4


def test_fanout_section_reports_the_gap_of_every_mode(results: dict[str, SectionResult]) -> None:
    result = results[fanout.NAME]
    _well_formed(result)
    assert set(result.results) == {f"{mode}@1" for mode in fanout.presets()}
    for row in result.results.values():
        assert row["turns"] == 3
        assert 0 <= row["gap_p50_ms"] <= row["gap_p99_ms"] <= row["gap_max_ms"]


def test_responses_section_compares_both_apis_bare_and_wrapped(results: dict[str, SectionResult]) -> None:
    result = results[responses.NAME]
    _well_formed(result)
    entry = result.results["10"]
    assert list(entry["variants"]) == [
        "chat bare",
        "chat wrapped",
        "responses bare",
        "responses wrapped",
        "responses moa",
    ]
    # Two streams of 10 deltas per sample: chat chunks, and Responses events from created to completed.
    assert {name: row["events_per_stream"] for name, row in entry["variants"].items()} == {
        "chat bare": 10,
        "chat wrapped": 10,
        "responses bare": 16,
        "responses wrapped": 16,
        "responses moa": 16,
    }
    assert (
        entry["variants"]["chat bare"]["cpu_over_bare"] == entry["variants"]["responses bare"]["cpu_over_bare"] == 1.0
    )
    assert set(entry["added_cpu_us_per_stream"]) == {"chat", "responses"}
    assert {"responses_wrapped_over_bare", "chat_wrapped_over_bare"} <= set(entry["ratios"])
    assert any(note.startswith("CPU metering adds per stream") for note in result.notes)


def test_plots_are_drawn_for_every_section(results: dict[str, SectionResult], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plt = suite.pyplot()
    for name, section in suite.SECTIONS.items():
        path = suite.save_figure(plt, section.plot(results[name], plt), tmp_path / f"{name}.png")
        assert path.read_bytes().startswith(b"\x89PNG")


def _turn(turn: str, calls: int = 4) -> list[EventKey]:
    return [
        *(EventKey("CallUsage", turn, f"{turn}-call-{i}") for i in range(calls)),
        EventKey("ReferenceDone", turn),
        EventKey("TurnEnd", turn, calls=calls),
        EventKey("TurnTrace", turn),
    ]


def test_event_check_passes_exactly_one_set_per_turn() -> None:
    check = check_turn_events([*_turn("a"), *_turn("b")], turns=2, calls_per_turn=4)
    assert check["ok"] is True
    assert (check["lost"], check["duplicated"], check["call_usage"]) == (0, 0, 8)


def test_event_check_finds_a_missing_call_usage() -> None:
    events = [*_turn("a"), *_turn("b")]
    events.remove(EventKey("CallUsage", "b", "b-call-2"))
    check = check_turn_events(events, turns=2, calls_per_turn=4)
    assert (check["ok"], check["lost"], check["duplicated"]) == (False, 1, 0)


def test_event_check_finds_a_duplicated_turn_end_and_a_reused_call_id() -> None:
    events = [*_turn("a"), EventKey("TurnEnd", "a", calls=4), *_turn("b")]
    check = check_turn_events(events, turns=2, calls_per_turn=4)
    assert (check["ok"], check["lost"], check["duplicated"]) == (False, 0, 1)
    events = [*_turn("a"), EventKey("CallUsage", "a", "a-call-0"), *_turn("b")]
    check = check_turn_events(events, turns=2, calls_per_turn=4)
    assert (check["ok"], check["duplicated"], check["reused_call_ids"]) == (False, 1, 1)


def test_event_check_tells_a_turn_of_fewer_calls_from_lost_events() -> None:
    check = check_turn_events([*_turn("a"), *_turn("b", calls=3)], turns=2, calls_per_turn=4)
    assert (check["ok"], check["lost"], check["odd_turns"]) == (False, 0, 1)
    short_of_its_own_count = [*_turn("a"), *_turn("b", calls=3)[1:]]
    assert check_turn_events(short_of_its_own_count, turns=2, calls_per_turn=4)["lost"] == 1


def test_event_check_counts_a_silent_turn_as_lost_whole() -> None:
    check = check_turn_events(_turn("a"), turns=2, calls_per_turn=4)
    assert (check["ok"], check["lost"], check["turns_seen"]) == (False, 6, 1)
    missing_trace = [key for key in _turn("a") if key.kind != "TurnTrace"]
    assert check_turn_events(missing_trace, turns=1, calls_per_turn=4)["lost"] == 1


def test_tables_align_their_columns() -> None:
    text = format_table(["variant", "µs"], [["bare", "95.1"], ["floor", "13.8"]])
    lines = text.splitlines()
    assert lines[0] == "variant    µs"
    assert lines[2:] == ["bare     95.1", "floor    13.8"]
    assert markdown_table(["a", "b"], [["x", "1"]]).splitlines() == ["| a | b |", "| --- | ---: |", "| x | 1 |"]


def test_json_results_carry_the_environment_and_the_table(tmp_path: Path) -> None:
    result = SectionResult(
        section="demo", title="A demo", headers=["h"], rows=[["1"]], results={"x": 1.5}, notes=["n"], config={"k": 2}
    )
    path = write_json(result, tmp_path / "out", extra={"command": "moa-stream bench"})
    document: dict[str, Any] = json.loads(path.read_text())
    assert path.name == "demo.json"
    assert document["results"] == {"x": 1.5}
    assert document["table"] == {"headers": ["h"], "rows": [["1"]]}
    assert document["command"] == "moa-stream bench"
    assert {"date", "openai", "cpu_count", "fast_mode"} <= set(document["environment"])


def test_without_matplotlib_the_suite_writes_json_and_says_why_there_is_no_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(suite, "pyplot", lambda: None)
    suite.run_suite(["fanout"], config=TINY, out_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["fanout.json"]
    assert suite.NO_MATPLOTLIB in capsys.readouterr().out


def test_helpers_rotate_and_take_percentiles() -> None:
    assert [rotated([1, 2, 3], r) for r in range(4)] == [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (51.0, 99.0, 100.0)


def test_bench_command_runs_a_quick_section_into_the_working_directory(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moa_stream", "bench", "--quick", "--sections", "fanout"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert fanout.TITLE in result.stdout
    document = json.loads((tmp_path / "moa-stream-bench" / "fanout.json").read_text())
    assert document["quick"] is True
    assert document["command"].startswith("moa-stream bench --quick")
    assert "written: moa-stream-bench/fanout.json" in result.stdout


def test_bench_command_names_the_same_sections_as_the_suite() -> None:
    assert list(_cli.BENCH_SECTIONS) == list(suite.SECTIONS)


def test_bench_results_go_to_the_working_directory_unless_asked_elsewhere(tmp_path: Path) -> None:
    # Relative: wherever the command runs, never into the source tree or the installed package.
    assert _cli.build_parser().parse_args(["bench"]).out_dir == Path("moa-stream-bench")
    assert _cli.build_parser().parse_args(["bench", "--out-dir", str(tmp_path)]).out_dir == tmp_path
    assert RESULTS_DIR == _cli.BENCH_OUT_DIR  # `python -m benchmarks` too
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    assert parser.parse_args([]).out_dir == Path("moa-stream-bench")
