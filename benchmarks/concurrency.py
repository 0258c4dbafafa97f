"""Section 3, concurrency: many streams and MoA turns in flight at once on one event loop.

For each level (1 to 1,000 in flight), the bare SDK and then a wrapped client (pass-through, a
counting sink and a trace_dir) run that many workers at once, each streaming short completions back
to back (at least `concurrency_streams` per round in all); then the same levels of MoA turns (3
references + an aggregator, all streamed, wrapped). One unmeasured round first opens the
connections, then each measured round reports
completions/s and chunks/s (wall clock), TTFT p50/p99 (first chunk the caller sees), peak RSS (sampled
from /proc/self/statm on a thread during the round), RSS per in-flight stream or turn, RSS before and
after the round (after a flush and a gc; also after glibc's malloc_trim, which tells memory still
held from memory the allocator kept), and whether every turn produced exactly its events (one
`CallUsage` per call with distinct call ids, one `TurnEnd`, one `TurnTrace`). Also
`python -m benchmarks --sections concurrency`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import statistics
import time
from pathlib import Path
from typing import Any

import openai

import moa_stream
from moa_stream import Preset
from moa_stream.testing import SimModel

from ._common import (
    CONNECT_TIMEOUT_S,
    Config,
    EventTally,
    RssSampler,
    Section,
    SectionResult,
    check_turn_events,
    drain,
    malloc_trim,
    new_client,
    percentile,
    rss_bytes,
    somaxconn,
    wrap_client,
)
from ._streams import stream_model, stream_models

NAME = "concurrency"
TITLE = "Concurrency: streams and MoA turns in flight at once"
PRESET = "trio"
KINDS = {"bare": "bare streams", "streams": "wrapped streams", "moa": "MoA turns"}
MB = 1024 * 1024


def models(config: Config) -> list[SimModel]:
    return stream_models([config.concurrency_chunks])


def trio(chunks: int) -> Preset:
    """Three references and an aggregator, every stream `chunks` long."""
    model = stream_model(chunks)
    return Preset(references=[model, model, model], aggregator=model, cadence="per_call")


@dataclasses.dataclass
class RoundResult:
    """One round at one level: what completed, when the first chunks came, and memory."""

    attempted: int
    started: int = 0
    """Turns whose request was issued (fewer than attempted only when the round timed out)."""
    completions: int = 0
    errors: int = 0
    first_error: str | None = None
    chunks: int = 0
    wall_s: float = 0.0
    timed_out: bool = False
    ttfts_s: list[float] = dataclasses.field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    rss_after_trim: int = 0
    events: dict[str, Any] | None = None
    sink_dropped: int = 0
    drained: bool = True
    drain_s: float = 0.0
    """How long the flush after the round took (events still on their way when the round ended)."""


async def run_round(
    client: openai.AsyncOpenAI,
    model: str,
    *,
    workers: int,
    per_worker: int,
    timeout_s: float,
    tally: EventTally | None = None,
    calls_per_turn: int = 1,
    wrapped: bool = True,
) -> RoundResult:
    """`workers` concurrent workers, each streaming `per_worker` completions back to back; then the
    events are drained and, with `tally`, checked."""
    result = RoundResult(attempted=workers * per_worker)

    async def worker(index: int) -> None:
        for k in range(per_worker):
            started = time.perf_counter()
            messages: list[Any] = [{"role": "user", "content": f"question {index} {k}"}]
            result.started += 1
            try:
                stream = await client.chat.completions.create(model=model, messages=messages, stream=True)
                seen = 0
                async with stream:
                    async for _ in stream:
                        if not seen:
                            result.ttfts_s.append(time.perf_counter() - started)
                        seen += 1
                result.chunks += seen
                result.completions += 1
            except Exception as exc:
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"

    gc.collect()
    result.rss_before = rss_bytes()
    with RssSampler() as sampler:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as tasks:
                for index in range(workers):
                    tasks.create_task(worker(index))
        except TimeoutError:
            result.timed_out = True
        result.wall_s = time.perf_counter() - started
    result.rss_peak = sampler.peak
    if wrapped:
        result.drained, result.drain_s = await drain(client)
        result.sink_dropped = sum(stats.dropped for stats in moa_stream.sink_stats(client))
    if tally is not None:
        result.events = check_turn_events(tally.keys, turns=result.started, calls_per_turn=calls_per_turn)
        tally.clear()
    gc.collect()
    result.rss_after = rss_bytes()
    malloc_trim()
    result.rss_after_trim = rss_bytes()
    return result


async def run_level(
    base_url: str, config: Config, work_dir: Path, *, kind: str, level: int
) -> tuple[dict[str, Any], list[RoundResult]]:
    """`kind` is `bare` (the SDK alone), `streams` (wrapped pass-through) or `moa` (MoA turns)."""
    moa = kind == "moa"
    wrapped = kind != "bare"
    calls = 4 if moa else 1
    gc.collect()
    rss_cold = rss_bytes()
    connections = calls * level + 16
    tally = EventTally() if wrapped else None
    client = new_client(base_url, connections=connections)
    if wrapped:
        options: dict[str, Any] = {"sinks": [tally], "trace_dir": work_dir / f"{kind}-{level}"}
        if moa:
            # The default of 16 reference calls in flight per upstream would queue the references.
            options |= {"presets": {PRESET: trio(config.concurrency_chunks)}, "upstream_concurrency": 3 * level + 16}
        client = wrap_client(client, **options)
    model = f"moa:{PRESET}" if moa else stream_model(config.concurrency_chunks)
    per_worker = math.ceil(config.concurrency_streams / level)
    rounds: list[RoundResult] = []
    try:
        # Unmeasured: opens the level's connections, so that "before" already holds the pool.
        await run_round(client, model, workers=level, per_worker=1, timeout_s=config.round_timeout_s, wrapped=wrapped)
        if tally is not None:
            tally.clear()
        for _ in range(config.concurrency_rounds):
            rounds.append(
                await run_round(
                    client,
                    model,
                    workers=level,
                    per_worker=per_worker,
                    timeout_s=config.round_timeout_s,
                    tally=tally,
                    calls_per_turn=calls,
                    wrapped=wrapped,
                )
            )
    finally:
        await client.close()
    ttfts = [t for r in rounds for t in r.ttfts_s]
    summary = {
        "kind": kind,
        "concurrency": level,
        "per_round": rounds[0].attempted,
        "rounds": len(rounds),
        "pool_connections": connections,
        "completions_per_s": statistics.median(r.completions / r.wall_s for r in rounds),
        "chunks_per_s": statistics.median(r.chunks / r.wall_s for r in rounds),
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3 if ttfts else None,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3 if ttfts else None,
        "rss_cold_mb": rss_cold / MB,
        "rss_before_mb": rounds[0].rss_before / MB,
        "rss_peak_mb": max(r.rss_peak for r in rounds) / MB,
        "rss_per_in_flight_kb": statistics.median((r.rss_peak - r.rss_before) / level for r in rounds) / 1024,
        "rss_after_mb": rounds[-1].rss_after / MB,
        "rss_after_trim_mb": rounds[-1].rss_after_trim / MB,
        "errors": sum(r.errors for r in rounds),
        "first_error": next((r.first_error for r in rounds if r.first_error), None),
        "timed_out_rounds": sum(r.timed_out for r in rounds),
        "sink_dropped": sum(r.sink_dropped for r in rounds),
        "drained": all(r.drained for r in rounds),
        "drain_s_max": max(r.drain_s for r in rounds),
        "events_ok": all(r.events is not None and r.events["ok"] for r in rounds) if wrapped else None,
        "events": [r.events for r in rounds],
    }
    return summary, rounds


async def run(base_url: str, config: Config, work_dir: Path) -> SectionResult:
    levels: list[dict[str, Any]] = []
    runs = [(kind, level) for level in config.stream_levels for kind in ("bare", "streams")]
    runs += [("moa", level) for level in config.moa_levels]
    for kind, level in runs:
        summary, _ = await run_level(base_url, config, work_dir, kind=kind, level=level)
        levels.append(summary)
    bare = {row["concurrency"]: row for row in levels if row["kind"] == "bare"}
    for row in levels:
        if row["kind"] == "streams" and row["concurrency"] in bare:
            row["throughput_over_bare"] = row["completions_per_s"] / bare[row["concurrency"]]["completions_per_s"]
    headers = [
        "kind",
        "in flight",
        "per round",
        "done/s",
        "chunks/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "peak RSS MB",
        "RSS/in-flight KB",
        "RSS before/after MB",
        "events",
    ]
    rows = [
        [
            KINDS[row["kind"]],
            f"{row['concurrency']:,}",
            f"{row['per_round']:,}",
            f"{row['completions_per_s']:,.0f}",
            f"{row['chunks_per_s']:,.0f}",
            _ms(row["ttft_p50_ms"]),
            _ms(row["ttft_p99_ms"]),
            f"{row['rss_peak_mb']:.0f}",
            f"{row['rss_per_in_flight_kb']:.0f}",
            f"{row['rss_before_mb']:.0f}/{row['rss_after_mb']:.0f} ({row['rss_after_trim_mb']:.0f})",
            _events(row),
        ]
        for row in levels
    ]
    notes = [
        f"streams of {config.concurrency_chunks} chunks; MoA turns are 3 references + an aggregator of that length, "
        "upstream_concurrency = 3 x in-flight + 16 (the default 16 would queue the references)",
        "pool: the SDK's default is 1,000 connections with 100 kept alive; each level uses calls x in-flight + 16, "
        f"all kept alive, and a {CONNECT_TIMEOUT_S:g} s connect timeout (the SDK's 5 s expires while the loop is "
        f"busy). Listen backlog: anyio asks for 65,536, the kernel caps it at somaxconn = {somaxconn()}",
        "RSS before/after: after an unmeasured round that opens the pool, before the first measured round and after "
        "the last (after flush + gc); in parentheses after malloc_trim",
    ]
    notes += [
        f"{row['kind']} x {row['concurrency']}: {row['errors']} errors ({row['first_error']}), "
        f"{row['timed_out_rounds']} rounds timed out"
        for row in levels
        if row["errors"] or row["timed_out_rounds"]
    ]
    ratios = [
        f"{row['throughput_over_bare']:.2f}x at {row['concurrency']:,}"
        for row in levels
        if "throughput_over_bare" in row
    ]
    if ratios:
        notes.append("wrapped streams' completions/s over bare: " + ", ".join(ratios))
    notes += _target_notes(levels)
    return SectionResult(
        section=NAME,
        title=TITLE,
        headers=headers,
        rows=rows,
        results={"levels": levels},
        notes=notes,
        config={
            "stream_levels": list(config.stream_levels),
            "moa_levels": list(config.moa_levels),
            "chunks": config.concurrency_chunks,
            "min_per_round": config.concurrency_streams,
            "rounds": config.concurrency_rounds,
            "round_timeout_s": config.round_timeout_s,
        },
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _events(row: dict[str, Any]) -> str:
    if row["events_ok"] is None:
        return "-"
    if row["events_ok"] and not row["sink_dropped"] and row["drained"]:
        return "exact"
    counts = {key: sum(e[key] for e in row["events"] if e) for key in ("lost", "duplicated", "odd_turns")}
    text = f"lost {counts['lost']}, dup {counts['duplicated']}, odd turns {counts['odd_turns']}"
    if row["sink_dropped"]:
        text += f", dropped {row['sink_dropped']}"
    return text if row["drained"] else text + ", not drained"


def _target_notes(levels: list[dict[str, Any]]) -> list[str]:
    top = max((row for row in levels if row["kind"] == "moa"), key=lambda row: row["concurrency"], default=None)
    if top is None:
        return []
    events = [e for e in top["events"] if e]
    lost = sum(e["lost"] for e in events) + top["sink_dropped"]
    duplicated = sum(e["duplicated"] for e in events)
    exact = top["events_ok"] and not top["sink_dropped"] and top["drained"] and not top["errors"]
    grew = top["rss_after_mb"] - top["rss_before_mb"]
    grew_trim = top["rss_after_trim_mb"] - top["rss_before_mb"]
    return [
        f"target {top['concurrency']:,} concurrent MoA turns with zero lost or duplicated events: "
        f"{'met' if exact else 'MISSED'} ({lost} lost, {duplicated} duplicated, "
        f"{sum(e['odd_turns'] for e in events)} turns without 4 calls, {top['errors']} errors; "
        f"the last events arrived {top['drain_s_max']:.1f} s after the round)",
        f"target RSS back to baseline after the {top['concurrency']:,}-turn rounds: before "
        f"{top['rss_before_mb']:.0f} MB, after {top['rss_after_mb']:.0f} MB ({grew:+.0f} MB), after malloc_trim "
        f"{top['rss_after_trim_mb']:.0f} MB ({grew_trim:+.0f} MB)",
    ]


def plot(result: SectionResult, plt: Any) -> Any:
    figure, (rate_axes, ttft_axes, rss_axes) = plt.subplots(1, 3, figsize=(14, 4.5))
    for kind, label in KINDS.items():
        rows = [row for row in result.results["levels"] if row["kind"] == kind]
        if not rows:
            continue
        levels = [row["concurrency"] for row in rows]
        rate_axes.plot(levels, [row["completions_per_s"] for row in rows], marker="o", label=label)
        ttft_axes.plot(levels, [row["ttft_p50_ms"] for row in rows], marker="o", label=f"{label} p50")
        ttft_axes.plot(levels, [row["ttft_p99_ms"] for row in rows], marker="x", linestyle="--", label=f"{label} p99")
        rss_axes.plot(levels, [max(row["rss_per_in_flight_kb"], 0.1) for row in rows], marker="o", label=label)
    for axes, label in (
        (rate_axes, "completions/s"),
        (ttft_axes, "TTFT ms"),
        (rss_axes, "peak RSS growth per in-flight KB"),
    ):
        axes.set_xscale("log")
        axes.set_xlabel("in flight")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    ttft_axes.set_yscale("log")
    rss_axes.set_yscale("log")
    figure.suptitle(TITLE)
    return figure


SECTION = Section(name=NAME, title=TITLE, models=models, run=run, plot=plot)
