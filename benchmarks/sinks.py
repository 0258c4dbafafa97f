"""Section 2, sinks on/off: what events and traces cost on top of the metering itself.

Side by side, interleaved: the bare SDK; the wrapped client with no sinks and no trace_dir (`off`:
calls are metered, events are built, nothing consumes them); and with a sync no-op sink and a
trace_dir (`on`: events cross to the sink thread, a sync sink runs on a worker thread, every turn
appends a trace line). The same pair in fast mode when this moa_stream has it. The flush of the
events is inside each sample, so the sink thread's work counts. Also `python -m benchmarks --sections sinks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moa_stream.testing import SimModel

from ._common import Config, Section, SectionResult, cpu_row, has_fast_mode
from ._streams import Reader, interleaved, sdk_reader, stream_models, streams_per_sample, summarize

NAME = "sinks"
TITLE = "Sinks on/off: no sinks and no trace_dir vs a sink and a trace_dir"


def models(config: Config) -> list[SimModel]:
    return stream_models(config.sink_sizes)


async def run(base_url: str, config: Config, work_dir: Path) -> SectionResult:
    fast = has_fast_mode()
    readers: list[Reader] = [
        sdk_reader("bare", base_url, wrapped=False),
        sdk_reader("wrapped off", base_url, sinks=False),
        sdk_reader("wrapped on", base_url, trace_dir=work_dir / "wrapped"),
    ]
    if fast:
        readers.append(sdk_reader("fast off", base_url, fast=True, sinks=False))
        readers.append(sdk_reader("fast on", base_url, fast=True, trace_dir=work_dir / "fast"))
    results: dict[str, Any] = {}
    try:
        for size in config.sink_sizes:
            streams = streams_per_sample(size, config.chunk_target)
            samples = await interleaved(readers, size, rounds=config.sink_rounds, streams=streams)
            variants = summarize(samples)
            for mode in ("wrapped", "fast"):
                if f"{mode} on" in variants:
                    on = variants[f"{mode} on"]["cpu_us_per_chunk"]["median"]
                    off = variants[f"{mode} off"]["cpu_us_per_chunk"]["median"]
                    variants[f"{mode} on"]["on_over_off"] = on / off
                    variants[f"{mode} on"]["added_us_per_chunk"] = on - off
            results[str(size)] = {"streams_per_sample": streams, "variants": variants}
    finally:
        for reader in readers:
            await reader.aclose()

    headers = ["chunks", "variant", "CPU µs/chunk", "min-max", "x bare", "on/off", "chunks/s"]
    rows = []
    for key, entry in results.items():
        for name, row in entry["variants"].items():
            rows.append(cpu_row(key, name, row, f"{row['on_over_off']:.3f}" if "on_over_off" in row else ""))
    notes = [] if fast else ["fast off/on: skipped, this moa_stream's wrap() has no `fast` keyword yet"]
    return SectionResult(
        section=NAME,
        title=TITLE,
        headers=headers,
        rows=rows,
        results=results,
        notes=notes,
        config={
            "sizes": list(config.sink_sizes),
            "rounds": config.sink_rounds,
            "chunks_per_sample": config.chunk_target,
        },
    )


def plot(result: SectionResult, plt: Any) -> Any:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    sizes = list(result.results)
    names = list(result.results[sizes[0]]["variants"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = [result.results[size]["variants"][name]["cpu_us_per_chunk"] for size in sizes]
        positions = [x + (i - (len(names) - 1) / 2) * width for x in range(len(sizes))]
        errors = [[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]]
        axes.bar(positions, [r["median"] for r in rows], width, yerr=errors, capsize=3, label=name)
    axes.set_xticks(range(len(sizes)), [f"{int(size):,} chunks" for size in sizes])
    axes.set_ylabel("CPU µs per chunk (median, min-max)")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend()
    axes.set_title(TITLE)
    return figure


SECTION = Section(name=NAME, title=TITLE, models=models, run=run, plot=plot)
