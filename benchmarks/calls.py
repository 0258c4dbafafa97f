"""Section 6, per-call cost: what a short call costs each variant, streamed and not, side by side.

Most calls an agent makes are short (tool-call turns of a few dozen chunks, structured outputs that
are not streamed), so what the middleware adds per call matters more than per chunk. Variants, each
on its own client and connection pool:
- `bare`: the openai SDK's `AsyncOpenAI`;
- `wrapped`: the same client wrapped, with no sinks and no trace_dir (the metering alone);
- `+ sink`: a sync no-op sink; `+ trace`: a trace_dir; `+ both`: the two;
- `fast` and `fast + both`: the same with `wrap(..., fast=True)`.

Workloads: 20-chunk streams read to the end, and non-streamed calls. Each sample is a run of calls back
to back with the flush of the client's events inside it; rounds are interleaved and rotated. Reported:
CPU µs per call (`process_time`, every thread: median over rounds, min-max), the ratio to bare, and
calls/s at 1 in flight. Then calls/s with `call_levels` calls in flight (default 1 and 32), and the
middleware's own CPU in a MoA turn (3 references and an aggregator of 20 chunks each): the turn's CPU
minus the work it cannot avoid (the three reference streams read by the HTTP client and msgspec alone,
at once, then the aggregator's stream read by the bare SDK for the caller), as a share of the turn's.
Also `python -m benchmarks --sections calls`.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import openai

import moa_stream
from moa_stream import Preset
from moa_stream.testing import SimModel

from ._common import Config, Section, SectionResult, new_client, null_sink, rotated, spread, wrap_client
from ._streams import MESSAGES, FloorReader, stream_model

NAME = "calls"
TITLE = "Per-call cost: 20-chunk streams and non-streamed calls, bare, wrapped and fast"
CHUNKS = 20
WORKLOADS = ("stream", "whole")
VARIANTS: dict[str, dict[str, bool]] = {
    "bare": {},
    "wrapped": {"wrapped": True},
    "+ sink": {"wrapped": True, "sink": True},
    "+ trace": {"wrapped": True, "trace": True},
    "+ both": {"wrapped": True, "sink": True, "trace": True},
    "fast": {"wrapped": True, "fast": True},
    "fast + both": {"wrapped": True, "fast": True, "sink": True, "trace": True},
}
TARGETS = {
    ("stream", "+ both"): 1.05,
    ("whole", "+ both"): 1.05,
    ("stream", "fast + both"): 0.6,
    ("whole", "fast + both"): 0.8,
}
"""CPU per call at 1 in flight, as a ratio to bare: the most (issue 15's targets)."""
MOA = Preset(references=[stream_model(CHUNKS)] * 3, aggregator=stream_model(CHUNKS), cadence="per_call")


def models(config: Config) -> list[SimModel]:
    return [SimModel(name=stream_model(CHUNKS), reply_tokens=CHUNKS - 2)]


class Caller:
    """One variant: a client, and how to make one call of a workload with it."""

    def __init__(self, name: str, base_url: str, work_dir: Path, connections: int) -> None:
        options = VARIANTS[name]
        self.name = name
        self.wrapped = options.get("wrapped", False)
        client = new_client(base_url, connections=connections)
        if self.wrapped:
            wrap: dict[str, Any] = {"presets": {"bench": MOA}}
            if options.get("sink"):
                wrap["sinks"] = [null_sink]
            if options.get("trace"):
                wrap["trace_dir"] = work_dir / name.replace(" ", "").replace("+", "-")
            client = wrap_client(client, fast=options.get("fast", False), **wrap)
        self.client: openai.AsyncOpenAI = client

    async def call(self, workload: str) -> None:
        model = stream_model(CHUNKS)
        if workload == "whole":
            await self.client.chat.completions.create(model=model, messages=MESSAGES)
            return
        stream = await self.client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
        async with stream:
            async for _ in stream:
                pass

    async def settle(self) -> None:
        if self.wrapped:
            await moa_stream.flush(self.client)

    async def aclose(self) -> None:
        await self.client.close()


async def sample(work: Callable[[], Awaitable[None]], settle: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of `work` and the flush of its events."""
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    await work()
    await settle()
    return time.process_time() - cpu, time.perf_counter() - wall


async def in_flight(caller: Caller, workload: str, calls: int, workers: int) -> None:
    """`calls` calls of `workload` from `workers` concurrent workers."""
    left = [calls]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await caller.call(workload)

    async with anyio.create_task_group() as group:
        for _ in range(workers):
            group.start_soon(worker)


async def per_call(callers: Sequence[Caller], workload: str, config: Config) -> dict[str, Any]:
    """CPU per call and calls/s of every variant at `workers` in flight, interleaved by round."""
    levels: dict[str, Any] = {}
    for workers in config.call_levels:
        calls = max(config.calls_per_sample, workers * 4)
        for caller in callers:  # warm up connections, caches and code paths
            await in_flight(caller, workload, workers, workers)
            await caller.settle()
        cpu: dict[str, list[float]] = {c.name: [] for c in callers}
        rate: dict[str, list[float]] = {c.name: [] for c in callers}
        for round_index in range(config.call_rounds):
            for caller in rotated(callers, round_index):
                work = functools.partial(in_flight, caller, workload, calls, workers)
                cpu_s, wall_s = await sample(work, caller.settle)
                cpu[caller.name].append(cpu_s / calls * 1e6)
                rate[caller.name].append(calls / wall_s)
        levels[str(workers)] = _summary(cpu, rate, calls)
    return levels


def _summary(cpu: Mapping[str, list[float]], rate: Mapping[str, list[float]], calls: int) -> dict[str, Any]:
    base_cpu, base_rate = statistics.median(cpu["bare"]), statistics.median(rate["bare"])
    return {
        name: {
            "cpu_us_per_call": spread(values),
            "cpu_over_bare": statistics.median(values) / base_cpu,
            "cpu_over_bare_paired": spread([v / b for v, b in zip(values, cpu["bare"], strict=True)]),
            "calls_per_s": spread(rate[name]),
            "rate_over_bare": statistics.median(rate[name]) / base_rate,
            "calls_per_sample": calls,
        }
        for name, values in cpu.items()
    }


async def moa_share(base_url: str, work_dir: Path, config: Config) -> dict[str, Any]:
    """The middleware's own CPU per MoA turn: the turn against the work it cannot avoid, the same
    three reference streams read by the HTTP client and msgspec alone (the floor), then the
    aggregator's stream read by the bare SDK for the caller."""
    bare = Caller("bare", base_url, work_dir, 8)
    floor = FloorReader(base_url)
    moa = Caller("+ both", base_url, work_dir / "moa", 8)

    async def four_bare() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(floor.read, CHUNKS)
        await bare.call("stream")

    async def one_turn() -> None:
        stream = await moa.client.chat.completions.create(model="moa:bench", messages=MESSAGES, stream=True)
        async with stream:
            async for _ in stream:
                pass

    turns = config.moa_turns
    runs: dict[str, tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = {
        "unavoidable": (four_bare, bare.settle),
        "moa turn": (one_turn, moa.settle),
    }
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for work, settle in runs.values():
            await work()
            await settle()
        for round_index in range(config.call_rounds):
            for name in rotated(list(runs), round_index):
                work, settle = runs[name]

                async def repeat(work: Callable[[], Awaitable[None]] = work) -> None:
                    for _ in range(turns):
                        await work()

                cpu_s, _ = await sample(repeat, settle)
                cpu[name].append(cpu_s / turns * 1e6)
    finally:
        await bare.aclose()
        await floor.aclose()
        await moa.aclose()
    own = [turn - floor for turn, floor in zip(cpu["moa turn"], cpu["unavoidable"], strict=True)]
    shares = [o / turn for o, turn in zip(own, cpu["moa turn"], strict=True)]
    return {
        "cpu_us_per_turn": spread(cpu["moa turn"]),
        "cpu_us_unavoidable": spread(cpu["unavoidable"]),
        "own_cpu_us_per_turn": spread(own),
        "own_share": spread(shares),
        "turns_per_sample": turns,
    }


async def run(base_url: str, config: Config, work_dir: Path) -> SectionResult:
    connections = max(config.call_levels)
    callers = [Caller(name, base_url, work_dir, connections) for name in VARIANTS]
    results: dict[str, Any] = {}
    try:
        for workload in WORKLOADS:
            results[workload] = await per_call(callers, workload, config)
    finally:
        for caller in callers:
            await caller.aclose()
    results["moa"] = await moa_share(base_url, work_dir, config)

    headers = ["workload", "in flight", "variant", "CPU µs/call", "min-max", "x bare", "calls/s", "calls/s x bare"]
    rows = []
    for workload in WORKLOADS:
        for workers, variants in results[workload].items():
            for name, row in variants.items():
                cpu = row["cpu_us_per_call"]
                rows.append(
                    [
                        "20-chunk stream" if workload == "stream" else "not streamed",
                        workers,
                        name,
                        f"{cpu['median']:,.0f}",
                        f"{cpu['min']:,.0f}-{cpu['max']:,.0f}",
                        f"{row['cpu_over_bare']:.3f}",
                        f"{row['calls_per_s']['median']:,.0f}",
                        f"{row['rate_over_bare']:.3f}",
                    ]
                )
    return SectionResult(
        section=NAME,
        title=TITLE,
        headers=headers,
        rows=rows,
        results=results,
        notes=_notes(results),
        config={
            "chunks": CHUNKS,
            "rounds": config.call_rounds,
            "calls_per_sample": config.calls_per_sample,
            "levels": list(config.call_levels),
            "moa_turns_per_sample": config.moa_turns,
            "sink": "a sync no-op sink",
        },
    )


def _notes(results: Mapping[str, Any]) -> list[str]:
    notes = []
    for (workload, name), limit in TARGETS.items():
        row = results[workload]["1"][name]
        ratio = row["cpu_over_bare"]
        verdict = "met" if ratio <= limit else "MISSED"
        notes.append(f"target {workload} {name} <= {limit}x bare CPU/call: {verdict} ({ratio:.2f}x)")
    for workers, variants in results["stream"].items():
        for name, limit in (("+ both", 0.95), ("fast + both", 1.2)):
            ratio = variants[name]["rate_over_bare"]
            verdict = "met" if ratio >= limit else "MISSED"
            notes.append(f"target {name} >= {limit}x bare calls/s at {workers} in flight: {verdict} ({ratio:.2f}x)")
    moa = results["moa"]
    share = moa["own_share"]["median"]
    notes.append(
        f"MoA turn (3 references + aggregator, 20 chunks each, + both): {moa['cpu_us_per_turn']['median']:,.0f} µs CPU,"
        f" of which the middleware's own {moa['own_cpu_us_per_turn']['median']:,.0f} µs = {share:.1%}"
        f" (target < 10%: {'met' if share < 0.10 else 'MISSED'})"
    )
    return notes


def plot(result: SectionResult, plt: Any) -> Any:
    figure, axes_pair = plt.subplots(1, 2, figsize=(11, 4.5))
    for axes, workload in zip(axes_pair, WORKLOADS, strict=True):
        variants = result.results[workload]["1"]
        names = list(variants)
        rows = [variants[name]["cpu_us_per_call"] for name in names]
        errors = [[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]]
        axes.bar(range(len(names)), [r["median"] for r in rows], yerr=errors, capsize=3)
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axes.set_ylabel("CPU µs per call (median, min-max)")
        axes.set_title("20-chunk streams" if workload == "stream" else "not streamed")
        axes.grid(True, axis="y", alpha=0.3)
    figure.suptitle(TITLE)
    figure.tight_layout()
    return figure


SECTION = Section(name=NAME, title=TITLE, models=models, run=run, plot=plot)
