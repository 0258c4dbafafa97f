"""Section 1, per-chunk cost: what a streamed chunk costs each variant, side by side.

Variants, each on its own client and connection pool, for streams of 10 to 10,000 chunks:
- `floor`: the HTTP client and msgspec alone (no SDK objects, no metering);
- `bare`: the openai SDK's `AsyncOpenAI`;
- `wrapped`: the same client wrapped by moa_stream, pass-through, with a sink and a trace dir;
- `fast`: the same with `wrap(..., fast=True)`, when this moa_stream has it;
- `moa`: a preset of one reference and an aggregator (both streams of the same length): CPU per
  aggregator chunk, so it includes reading the reference; its TTFT includes the whole reference.

Reports CPU µs per chunk (median over rounds, min-max), the ratio to bare, TTFT added to bare's
(difference of medians) and chunks/s (wall clock). Also `python -m benchmarks --sections chunks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moa_stream.testing import SimModel

from ._common import Config, Section, SectionResult, cpu_row, has_fast_mode
from ._streams import (
    FloorReader,
    Reader,
    interleaved,
    moa_presets,
    sdk_reader,
    stream_models,
    streams_per_sample,
    summarize,
)

NAME = "chunks"
TITLE = "Per-chunk cost: floor, bare SDK, wrapped, fast mode, MoA preset"
FAST_SKIPPED = "fast: skipped, this moa_stream's wrap() has no `fast` keyword yet"


def models(config: Config) -> list[SimModel]:
    return stream_models(config.chunk_sizes)


async def run(base_url: str, config: Config, work_dir: Path) -> SectionResult:
    fast = has_fast_mode()
    readers: list[Reader] = [
        FloorReader(base_url),
        sdk_reader("bare", base_url, wrapped=False),
        sdk_reader("wrapped", base_url, trace_dir=work_dir / "wrapped"),
    ]
    if fast:
        readers.append(sdk_reader("fast", base_url, fast=True, trace_dir=work_dir / "fast"))
    readers.append(sdk_reader("moa", base_url, presets=moa_presets(config.chunk_sizes), trace_dir=work_dir / "moa"))
    results: dict[str, Any] = {}
    try:
        for size in config.chunk_sizes:
            streams = streams_per_sample(size, config.chunk_target)
            samples = await interleaved(readers, size, rounds=config.chunk_rounds, streams=streams)
            variants = summarize(samples)
            results[str(size)] = {"streams_per_sample": streams, "variants": variants, "ratios": _ratios(variants)}
    finally:
        for reader in readers:
            await reader.aclose()

    headers = ["chunks", "variant", "CPU µs/chunk", "min-max", "x bare", "+TTFT ms", "chunks/s"]
    rows = []
    for key, entry in results.items():
        for name, row in entry["variants"].items():
            rows.append(cpu_row(key, name, row, "" if name == "bare" else f"{row['added_ttft_ms']:+.2f}"))
    notes = [] if fast else [FAST_SKIPPED]
    notes += _target_notes(results)
    notes.append(
        "moa: CPU per aggregator chunk includes the reference stream of the same length; its added TTFT "
        "is the whole reference stream plus the turn's bookkeeping"
    )
    return SectionResult(
        section=NAME,
        title=TITLE,
        headers=headers,
        rows=rows,
        results=results,
        notes=notes,
        config={
            "sizes": list(config.chunk_sizes),
            "rounds": config.chunk_rounds,
            "chunks_per_sample": config.chunk_target,
            "wrapped": "one sync no-op sink and a trace_dir; the flush of its events is inside each sample",
        },
    )


def _ratios(variants: dict[str, Any]) -> dict[str, float]:
    def cpu(name: str) -> float:
        value: float = variants[name]["cpu_us_per_chunk"]["median"]
        return value

    ratios = {f"{name}_over_bare": cpu(name) / cpu("bare") for name in variants if name != "bare"}
    if "fast" in variants:
        ratios["fast_over_floor"] = cpu("fast") / cpu("floor")
    return ratios


def _target_notes(results: dict[str, Any]) -> list[str]:
    """The issue's targets against these figures, at every size."""

    def figures(key: str) -> str:
        return ", ".join(f"{float(e['ratios'][key]):.2f}x at {int(s):,}" for s, e in results.items())

    def verdict(key: str, limit: float) -> str:
        return "met" if all(e["ratios"][key] <= limit for e in results.values()) else "MISSED"

    notes = [
        f"target wrapped <= 1.02x bare CPU/chunk: {verdict('wrapped_over_bare', 1.02)} ({figures('wrapped_over_bare')})"
    ]
    if all("fast_over_bare" in e["ratios"] for e in results.values()):
        notes.append(f"target fast <= 0.15x bare: {verdict('fast_over_bare', 0.15)} ({figures('fast_over_bare')})")
        notes.append(f"target fast <= 1.5x floor: {verdict('fast_over_floor', 1.5)} ({figures('fast_over_floor')})")
    return notes


def plot(result: SectionResult, plt: Any) -> Any:
    figure, (cpu_axes, rate_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = [int(size) for size in result.results]
    names = list(next(iter(result.results.values()))["variants"])
    for name in names:
        rows = [entry["variants"][name] for entry in result.results.values()]
        median = [row["cpu_us_per_chunk"]["median"] for row in rows]
        low = [m - row["cpu_us_per_chunk"]["min"] for m, row in zip(median, rows, strict=True)]
        high = [row["cpu_us_per_chunk"]["max"] - m for m, row in zip(median, rows, strict=True)]
        cpu_axes.errorbar(sizes, median, yerr=[low, high], marker="o", capsize=3, label=name)
        rate_axes.plot(sizes, [row["chunks_per_s"]["median"] for row in rows], marker="o", label=name)
    for axes, label in ((cpu_axes, "CPU µs per chunk (median, min-max)"), (rate_axes, "chunks/s (wall clock)")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("chunks per stream")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    cpu_axes.legend()
    figure.suptitle(TITLE)
    return figure


SECTION = Section(name=NAME, title=TITLE, models=models, run=run, plot=plot)
