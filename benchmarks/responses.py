"""Section 5, the Responses API next to chat: what a streamed event costs, bare and wrapped, side by side.

Variants, each on its own client and connection pool, for replies of 10 to 10,000 text deltas (the
same simulator models as the chunks section: a chat stream of `n` chunks, a Responses stream of `n + 6`
events, created to completed):
- `chat bare` / `chat wrapped`: `chat.completions.create(stream=True)`, as in the chunks section;
- `responses bare` / `responses wrapped`: `responses.create(stream=True)` read to its end;
- `responses moa`: a `moa:` preset of one reference (chat completions upstream) and an aggregator (the
  Responses API upstream), both of the same length, served through the Responses API.

Reports CPU µs per caller-visible event (median over rounds, min-max), the ratio to the same API's bare
client, and the CPU each API's metering adds per stream (paired per round: wrapped minus bare). Also
`python -m benchmarks --sections responses`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import openai

from moa_stream import Preset
from moa_stream.testing import SimModel

from ._common import Config, Section, SectionResult, cpu_row, new_client, null_sink, spread, wrap_client
from ._streams import (
    Reader,
    Sample,
    SdkReader,
    Stream,
    interleaved,
    moa_presets,
    sdk_reader,
    stream_models,
    streams_per_sample,
    summarize,
)

NAME = "responses"
TITLE = "The Responses API next to chat: CPU per event, bare and wrapped"
INPUT = "Count for me"
APIS = ("chat", "responses")


def models(config: Config) -> list[SimModel]:
    return stream_models(config.chunk_sizes)


class ResponsesReader(SdkReader):
    """`client.responses.create(stream=True)` read to its end: every event counts, the first is TTFT."""

    async def read(self, size: int) -> Stream:
        events = 0
        ttft = 0.0
        started = time.perf_counter()
        stream = await self.client.responses.create(model=self.model(size), input=INPUT, stream=True)
        async with stream:
            async for _ in stream:
                events += 1
                if events == 1:
                    ttft = time.perf_counter() - started
        return Stream(events, ttft)


class ResponsesMoaReader(ResponsesReader):
    def model(self, size: int) -> str:
        return f"moa:chunks-{size}"


def responses_reader(
    name: str, base_url: str, trace_dir: Path | None = None, presets: Mapping[str, Preset] | None = None
) -> ResponsesReader:
    client: openai.AsyncOpenAI = new_client(base_url)
    if trace_dir is None:
        return ResponsesReader(name, client, wrapped=False)
    options: dict[str, Any] = {"sinks": [null_sink], "trace_dir": trace_dir}
    if presets:
        options["presets"] = presets
    cls = ResponsesMoaReader if presets else ResponsesReader
    return cls(name, wrap_client(client, **options), wrapped=True)


async def run(base_url: str, config: Config, work_dir: Path) -> SectionResult:
    readers: list[Reader] = [
        sdk_reader("chat bare", base_url, wrapped=False),
        sdk_reader("chat wrapped", base_url, trace_dir=work_dir / "chat"),
        responses_reader("responses bare", base_url),
        responses_reader("responses wrapped", base_url, work_dir / "responses"),
        responses_reader("responses moa", base_url, work_dir / "moa", presets=moa_presets(config.chunk_sizes)),
    ]
    results: dict[str, Any] = {}
    try:
        for size in config.chunk_sizes:
            streams = streams_per_sample(size, config.chunk_target)
            samples = await interleaved(readers, size, rounds=config.chunk_rounds, streams=streams)
            results[str(size)] = {"streams_per_sample": streams, **_summary(samples, streams)}
    finally:
        for reader in readers:
            await reader.aclose()

    headers = ["deltas", "variant", "CPU µs/event", "min-max", "x own bare", "events/stream", "events/s"]
    rows = []
    for key, entry in results.items():
        for name, row in entry["variants"].items():
            rows.append(cpu_row(key, name, row, f"{row['events_per_stream']:,}"))
    return SectionResult(
        section=NAME,
        title=TITLE,
        headers=headers,
        rows=rows,
        results=results,
        notes=_notes(results),
        config={
            "sizes": list(config.chunk_sizes),
            "rounds": config.chunk_rounds,
            "events_per_sample": config.chunk_target,
            "wrapped": "one sync no-op sink and a trace_dir; the flush of its events is inside each sample",
        },
    )


def _summary(samples: Mapping[str, Sequence[Sample]], streams: int) -> dict[str, Any]:
    """Each variant against its own API's bare client, and the CPU each API's metering adds per stream."""
    variants: dict[str, Any] = {}
    added: dict[str, Any] = {}
    for api in APIS:
        own = {name: runs for name, runs in samples.items() if name.startswith(api)}
        variants.update(summarize(own, baseline=f"{api} bare"))
        paired = [
            (wrapped.cpu_s - bare.cpu_s) / streams * 1e6
            for wrapped, bare in zip(samples[f"{api} wrapped"], samples[f"{api} bare"], strict=True)
        ]
        added[api] = spread(paired)
    for row in variants.values():
        row["events_per_stream"] = row["chunks_per_sample"] // streams
    ratios = {
        "responses_wrapped_over_bare": variants["responses wrapped"]["cpu_over_bare"],
        "chat_wrapped_over_bare": variants["chat wrapped"]["cpu_over_bare"],
        "responses_bare_over_chat_bare_per_stream": _per_stream(variants, "responses bare")
        / _per_stream(variants, "chat bare"),
    }
    return {"variants": variants, "added_cpu_us_per_stream": added, "ratios": ratios}


def _per_stream(variants: Mapping[str, Any], name: str) -> float:
    row = variants[name]
    value: float = row["cpu_us_per_chunk"]["median"] * row["events_per_stream"]
    return value


def _notes(results: Mapping[str, Any]) -> list[str]:
    def added(api: str) -> str:
        return ", ".join(
            f"{e['added_cpu_us_per_stream'][api]['median']:+.0f} µs at {int(size):,}" for size, e in results.items()
        )

    return [
        "x own bare: responses variants against `responses bare`, chat variants against `chat bare`",
        f"CPU metering adds per stream (wrapped minus bare, paired per round, median): chat {added('chat')}; "
        f"responses {added('responses')}",
        "responses moa: CPU per caller event includes the reference's chat stream of the same length",
    ]


def plot(result: SectionResult, plt: Any) -> Any:
    figure, (cpu_axes, added_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = [int(size) for size in result.results]
    names = list(next(iter(result.results.values()))["variants"])
    for name in names:
        rows = [entry["variants"][name] for entry in result.results.values()]
        cpu_axes.plot(sizes, [row["cpu_us_per_chunk"]["median"] for row in rows], marker="o", label=name)
    for api in APIS:
        added = [entry["added_cpu_us_per_stream"][api]["median"] for entry in result.results.values()]
        added_axes.plot(sizes, added, marker="o", label=api)
    cpu_axes.set_yscale("log")
    cpu_axes.set_ylabel("CPU µs per event (median)")
    added_axes.set_ylabel("CPU µs metering adds per stream (median)")
    for axes in (cpu_axes, added_axes):
        axes.set_xscale("log")
        axes.set_xlabel("text deltas per stream")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle(TITLE)
    return figure


SECTION = Section(name=NAME, title=TITLE, models=models, run=run, plot=plot)
