"""Time to first token of a MoA turn: wait for every reference vs quorum + grace, side by side.

Three references with lognormal time-to-first-token (median 0.2 s, sigma 0.8: now and then one is
several times slower) and one aggregator, all on the in-process simulator. The same turns (same
prompts, so the same latencies) run once per mode. Reports TTFT p50/p99 seen by the caller, the
ratio quorum/wait-all, and the gap between the fan-out rule being met and the aggregator request
leaving. Run: `.venv/bin/python benchmarks/moa_ttft.py [--turns 60]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import anyio

import moa_stream
from moa_stream import Preset
from moa_stream.testing import SimModel, Simulator, sim_client

MODES = {
    "wait_all": Preset(references=["ref-1", "ref-2", "ref-3"], aggregator="agg", cadence="per_call"),
    "quorum_2_grace_50ms": Preset(
        references=["ref-1", "ref-2", "ref-3"], aggregator="agg", cadence="per_call", quorum=2, grace=0.05
    ),
}


def simulator() -> Simulator:
    references = [SimModel(name=f"ref-{i}", ttft_s=0.2, jitter=0.8, tokens_per_s=400) for i in (1, 2, 3)]
    return Simulator([*references, SimModel(name="agg", ttft_s=0.05, tokens_per_s=400)])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_mode(name: str, turns: int, concurrency: int) -> dict[str, Any]:
    traces: list[moa_stream.TurnTrace] = []

    def sink(event: moa_stream.Event) -> None:
        if isinstance(event, moa_stream.TurnTrace):
            traces.append(event)

    client = moa_stream.wrap(sim_client(simulator()), sinks=[sink], presets={name: MODES[name]})
    ttfts: list[float] = []
    limiter = anyio.Semaphore(concurrency)

    async def turn(index: int) -> None:
        async with limiter:
            started = time.perf_counter()
            stream = await client.chat.completions.create(
                model=f"moa:{name}", messages=[{"role": "user", "content": f"question number {index}"}], stream=True
            )
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        ttfts.append(time.perf_counter() - started)
                        break

    async with anyio.create_task_group() as tasks:
        for index in range(turns):
            tasks.start_soon(turn, index)
    await client.close()
    waits = [t.aggregator_wait_s for t in traces if t.aggregator_wait_s is not None]
    return {
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "aggregator_wait_p50_ms": statistics.median(waits) * 1e3,
        "aggregator_wait_p99_ms": percentile(waits, 0.99) * 1e3,
        "turns": len(ttfts),
    }


async def run(turns: int, concurrency: int) -> dict[str, Any]:
    return {name: await run_mode(name, turns, concurrency) for name in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moa_ttft.json")
    args = parser.parse_args()
    results = asyncio.run(run(args.turns, args.concurrency))
    wait_all, quorum = results["wait_all"], results["quorum_2_grace_50ms"]
    print(f"{'mode':<22}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'agg wait p50 ms':>17}{'agg wait p99 ms':>17}")
    for name, row in results.items():
        print(
            f"{name:<22}{row['ttft_p50_s']:>12.3f}{row['ttft_p99_s']:>12.3f}"
            f"{row['aggregator_wait_p50_ms']:>17.3f}{row['aggregator_wait_p99_ms']:>17.3f}"
        )
    ratios = {
        "ttft_p50_quorum_over_wait_all": quorum["ttft_p50_s"] / wait_all["ttft_p50_s"],
        "ttft_p99_quorum_over_wait_all": quorum["ttft_p99_s"] / wait_all["ttft_p99_s"],
    }
    print(
        f"\nquorum / wait-all: p50 {ratios['ttft_p50_quorum_over_wait_all']:.3f}, "
        f"p99 {ratios['ttft_p99_quorum_over_wait_all']:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"turns": args.turns, "concurrency": args.concurrency, **results, **ratios}, indent=2)
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
