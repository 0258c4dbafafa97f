"""Load: concurrent MoA turns for a fixed time with injected faults; no event lost or duplicated.

Keeps `--turns` MoA turns (3 references + aggregator) in flight against the in-process simulator for
`--seconds`, injecting a fault into `--fault-rate` of the upstream requests (HTTP 500 or 429,
disconnect, malformed chunk, in-stream error). It reports per round (every `--round-seconds`): turns
done, events, RSS; and at the end: every turn had exactly one TurnEnd and one TurnTrace, every
CallUsage a distinct call id, one CallUsage per upstream request, and the sinks dropped nothing.
Run: `.venv/bin/python -m benchmarks.load [--seconds 60 --turns 1000 --fault-rate 0.05]`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import time
from typing import Any

import anyio

import moa_stream
from moa_stream import Preset
from moa_stream.testing import SimModel, Simulator, sim_client

FAULTS = ("http_500;after=0", "http_429;after=0", "disconnect;after=3", "malformed;after=2", "stream_error;after=2")


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class FaultySimulator(Simulator):
    """Injects a random fault into a share of the requests, as a per-request header would."""

    def __init__(self, models: list[SimModel], rate: float, seed: int) -> None:
        super().__init__(models)
        self._rate = rate
        self._random = random.Random(seed)
        self.faults = 0

    async def handle(self, method: str, path: str, headers: Any, body: bytes, **options: Any) -> Any:
        if path.endswith("/chat/completions") and self._random.random() < self._rate:
            self.faults += 1
            headers = {**headers, "x-sim-fault": self._random.choice(FAULTS)}
        return await super().handle(method, path, headers, body, **options)


class Counter:
    def __init__(self) -> None:
        self.kinds: collections.Counter[str] = collections.Counter()
        self.call_ids: set[str] = set()
        self.duplicates = 0
        self.per_turn: collections.Counter[str] = collections.Counter()

    def __call__(self, event: moa_stream.Event) -> None:
        self.kinds[type(event).__name__] += 1
        if isinstance(event, moa_stream.CallUsage):
            if event.call_id in self.call_ids:
                self.duplicates += 1
            self.call_ids.add(event.call_id)
        elif isinstance(event, moa_stream.TurnEnd | moa_stream.TurnTrace):
            self.per_turn[f"{type(event).__name__}:{event.turn_id}"] += 1


async def run(seconds: float, turns: int, rate: float, round_seconds: float) -> dict[str, Any]:
    models = [SimModel(name=f"ref-{i}", reply_tokens=20) for i in range(3)] + [SimModel(name="agg", reply_tokens=20)]
    sim = FaultySimulator(models, rate, seed=1)
    counter = Counter()
    preset = Preset(references=["ref-0", "ref-1", "ref-2"], aggregator="agg", cadence="per_call", reference_timeout=30)
    client = moa_stream.wrap(
        sim_client(sim, max_retries=0), sinks=[counter], presets={"load": preset}, upstream_concurrency=3 * turns
    )
    deadline = time.monotonic() + seconds
    started = failed = 0
    rounds: list[dict[str, Any]] = []

    async def worker(index: int) -> None:
        nonlocal started, failed
        while time.monotonic() < deadline:
            started += 1
            try:
                stream = await client.chat.completions.create(
                    model="moa:load", messages=[{"role": "user", "content": f"q{index}-{started}"}], stream=True
                )
                async for _ in stream:
                    pass
            except Exception:
                failed += 1  # an aggregator fault reaches the caller, as it would from the bare SDK

    async def report() -> None:
        while time.monotonic() < deadline:
            await anyio.sleep(round_seconds)
            await moa_stream.flush(client)
            rounds.append({"turns_started": started, "turn_ends": counter.kinds["TurnEnd"], "rss_mib": rss_mib()})
            print(f"  {rounds[-1]}", flush=True)

    baseline = rss_mib()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(report)
        for index in range(turns):
            tasks.start_soon(worker, index)
    await client.close()
    stats = moa_stream.sink_stats(client)
    ends = [k for k in counter.per_turn if k.startswith("TurnEnd:")]
    traces = [k for k in counter.per_turn if k.startswith("TurnTrace:")]
    return {
        "turns_started": started,
        "caller_errors": failed,
        "upstream_requests": sim.stats.requests,
        "faults_injected": sim.faults,
        "call_usage": counter.kinds["CallUsage"],
        "duplicate_call_ids": counter.duplicates,
        "turns_with_one_end": sum(counter.per_turn[k] == 1 for k in ends),
        "turns_with_one_trace": sum(counter.per_turn[k] == 1 for k in traces),
        "sink_dropped": sum(s.dropped for s in stats),
        "rss_baseline_mib": baseline,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--turns", type=int, default=1000, help="MoA turns in flight")
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--round-seconds", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run(run(args.seconds, args.turns, args.fault_rate, args.round_seconds))
    checks = {
        "every started turn ended once": result["turns_with_one_end"] == result["turns_started"],
        "every started turn traced once": result["turns_with_one_trace"] == result["turns_started"],
        "one CallUsage per upstream request": result["call_usage"] == result["upstream_requests"],
        "no duplicated call id": result["duplicate_call_ids"] == 0,
        "no event dropped by a sink": result["sink_dropped"] == 0,
    }
    for key, value in result.items():
        if key != "rounds":
            print(f"{key}: {value}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
