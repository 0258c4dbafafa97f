"""Section 4, fan-out: the gap between the fan-out rule being met and the aggregator request leaving.

The gap is each turn's `TurnTrace.aggregator_wait_s`: from the moment the quorum-and-grace rule lets
the aggregator start (`run_layer` returns that instant) to the moment its request is handed to the
metered send (so it includes cancelling stragglers, building the aggregator's prompt and emitting
`Aggregating`). Three references of 20 chunks and an aggregator, at 1 and 10 turns in flight:
- `wait_all`: no quorum, every reference is waited for;
- `quorum_grace`: quorum 2, grace 50 ms, every reference fast (the rule is met when the last ends);
- `quorum_straggler`: quorum 2, grace 10 ms, and the third reference has a 1 s TTFT (the only
  simulated latency of the suite), so the grace expires and the straggler is cancelled.
The modes are interleaved in rounds, in an order that rotates. Also `python -m benchmarks --sections fanout`.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from moa_stream import Preset
from moa_stream.testing import SimModel

from ._common import (
    Config,
    EventTally,
    Section,
    SectionResult,
    drain,
    new_client,
    percentile,
    rotated,
    wrap_client,
)
from ._streams import stream_model, stream_models

NAME = "fanout"
TITLE = "Fan-out: quorum met -> aggregator request sent (TurnTrace.aggregator_wait_s)"
CHUNKS = 20
STRAGGLER = SimModel(name="fanout-straggler", ttft_s=1.0, reply_tokens=CHUNKS - 2)
TARGET_P99_MS = 1.0


def models(config: Config) -> list[SimModel]:
    return [*stream_models([CHUNKS]), STRAGGLER]


def presets() -> dict[str, Preset]:
    fast = stream_model(CHUNKS)
    trio = [fast, fast, fast]
    return {
        "wait_all": Preset(references=trio, aggregator=fast, cadence="per_call"),
        "quorum_grace": Preset(references=trio, aggregator=fast, cadence="per_call", quorum=2, grace=0.05),
        "quorum_straggler": Preset(
            references=[fast, fast, STRAGGLER.name], aggregator=fast, cadence="per_call", quorum=2, grace=0.01
        ),
    }


async def run_turns(client: Any, preset: str, *, turns: int, concurrency: int, ttfts: list[float]) -> None:
    """`turns` turns of `moa:<preset>`, `concurrency` at a time; appends each turn's TTFT (s)."""
    queue = iter(range(turns))
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        for index in queue:
            started = loop.time()
            first: float | None = None
            messages: list[Any] = [{"role": "user", "content": f"question {index}"}]
            stream = await client.chat.completions.create(model=f"moa:{preset}", messages=messages, stream=True)
            async with stream:
                async for _ in stream:
                    first = loop.time() if first is None else first
            if first is not None:
                ttfts.append(first - started)

    async with asyncio.TaskGroup() as tasks:
        for _ in range(concurrency):
            tasks.create_task(worker())


async def run(base_url: str, config: Config, work_dir: Path) -> SectionResult:
    modes = presets()
    results: dict[str, Any] = {}
    for level in config.fanout_levels:
        tally = EventTally()
        client = wrap_client(
            new_client(base_url, connections=4 * level + 16),
            presets=modes,
            sinks=[tally],
            upstream_concurrency=3 * level + 16,
        )
        ttfts: dict[str, list[float]] = {name: [] for name in modes}
        per_batch = math.ceil(config.fanout_turns / config.fanout_rounds)
        try:
            for name in modes:  # warm-up: connections and code paths
                await run_turns(client, name, turns=level, concurrency=level, ttfts=[])
            await drain(client)
            tally.clear()
            for round_index in range(config.fanout_rounds):
                for name in rotated(list(modes), round_index):
                    await run_turns(client, name, turns=per_batch, concurrency=level, ttfts=ttfts[name])
            await drain(client)
        finally:
            await client.close()
        for name in modes:
            waits_ms = [w * 1e3 for w in tally.waits.get(name, [])]
            results[f"{name}@{level}"] = {
                "mode": name,
                "concurrency": level,
                "turns": len(waits_ms),
                "gap_p50_ms": percentile(waits_ms, 0.5),
                "gap_p99_ms": percentile(waits_ms, 0.99),
                "gap_max_ms": max(waits_ms),
                "ttft_p50_ms": percentile(ttfts[name], 0.5) * 1e3,
                "ttft_p99_ms": percentile(ttfts[name], 0.99) * 1e3,
            }
    headers = ["mode", "in flight", "turns", "gap p50 ms", "gap p99 ms", "gap max ms", "TTFT p50 ms", "TTFT p99 ms"]
    rows = [
        [
            row["mode"],
            str(row["concurrency"]),
            str(row["turns"]),
            f"{row['gap_p50_ms']:.3f}",
            f"{row['gap_p99_ms']:.3f}",
            f"{row['gap_max_ms']:.3f}",
            f"{row['ttft_p50_ms']:.1f}",
            f"{row['ttft_p99_ms']:.1f}",
        ]
        for row in results.values()
    ]
    missed = [key for key, row in results.items() if row["gap_p99_ms"] > TARGET_P99_MS]
    worst = max(results.values(), key=lambda row: row["gap_p99_ms"])
    notes = [
        f"target aggregator gap <= {TARGET_P99_MS:g} ms p99: {'MISSED at ' + ', '.join(missed) if missed else 'met'} "
        f"(worst p99 {worst['gap_p99_ms']:.3f} ms: {worst['mode']} at {worst['concurrency']} in flight)"
    ]
    return SectionResult(
        section=NAME,
        title=TITLE,
        headers=headers,
        rows=rows,
        results=results,
        notes=notes,
        config={
            "levels": list(config.fanout_levels),
            "turns_per_mode": per_batch * config.fanout_rounds,
            "rounds": config.fanout_rounds,
            "chunks": CHUNKS,
            "straggler_ttft_s": STRAGGLER.ttft_s,
        },
    )


def plot(result: SectionResult, plt: Any) -> Any:
    figure, axes = plt.subplots(figsize=(9, 4.5))
    rows = list(result.results.values())
    labels = [f"{row['mode']}\n{row['concurrency']} in flight" for row in rows]
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [row["gap_p50_ms"] for row in rows], 0.4, label="p50")
    axes.bar([p + 0.2 for p in positions], [row["gap_p99_ms"] for row in rows], 0.4, label="p99")
    axes.axhline(TARGET_P99_MS, color="red", linestyle="--", linewidth=1, label="target p99")
    axes.set_xticks(list(positions), labels, fontsize="small")
    axes.set_ylabel("ms from rule met to aggregator request")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend()
    axes.set_title(TITLE, fontsize="medium")
    return figure


SECTION = Section(name=NAME, title=TITLE, models=models, run=run, plot=plot)
