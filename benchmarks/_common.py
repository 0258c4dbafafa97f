"""What the sections share: the simulator subprocess, clients, statistics, RSS, event checks, output."""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import importlib
import inspect
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import openai

import moa_stream
from moa_stream._sdk import default_http_module
from moa_stream.testing import SimModel

# Relative, so in the working directory: results are the user's files, never written into the
# source tree or the installed package (`moa-stream bench` has the same default).
RESULTS_DIR = Path("moa-stream-bench")

# -- the simulator in a subprocess ------------------------------------------------------------------

# The simulator runs in its own process so that this process's CPU time is the client's alone. It
# prints its port once listening. anyio asks for a listen backlog of 65536, which the kernel caps at
# net.core.somaxconn; the descriptor limit is raised for the 1,000-stream rounds.
_SERVER = """
import resource, sys, anyio, msgspec
from moa_stream.testing import Simulator, SimModel
from moa_stream.testing import SimServer
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
models = msgspec.json.decode(sys.argv[1], type=list[SimModel])

async def main() -> None:
    async with SimServer(Simulator(models), host="127.0.0.1", port=0) as server:
        print(server.port, flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


class SimProcess:
    """The embedded simulator serving `models` over loopback HTTP from a subprocess, for a `with` block."""

    def __init__(self, models: Iterable[SimModel]) -> None:
        unique: dict[str, SimModel] = {}
        for model in models:
            unique.setdefault(model.name, model)
        self.models = list(unique.values())
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> SimProcess:
        package_root = str(Path(moa_stream.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, msgspec.json.encode(self.models).decode()],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the simulator subprocess did not start (it said {line!r})")
        self.port = int(line)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit (1,000 streams hold 1,000+ sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def somaxconn() -> int | None:
    """The kernel's cap on a listen backlog (Linux), or None where it cannot be read."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return None


# -- clients ----------------------------------------------------------------------------------------


def has_fast_mode() -> bool:
    """Whether this moa_stream offers `wrap(..., fast=True)`."""
    return "fast" in inspect.signature(moa_stream.wrap).parameters


CONNECT_TIMEOUT_S = 120.0
"""Connect timeout of the many-connection clients (the SDK's is 5 s)."""


def new_client(base_url: str, *, connections: int | None = None) -> openai.AsyncOpenAI:
    """A plain AsyncOpenAI for the simulator, without retries.

    `connections` raises the SDK's pool limit (1,000 connections, 100 kept alive by default) to that
    many, all kept alive, and its 5 s connect timeout to `CONNECT_TIMEOUT_S`: with a thousand turns on
    one event loop, a connect that the kernel completed at once may wait longer than 5 s for the loop
    to resume it, and these rounds measure throughput and events, not the SDK's timeouts."""
    http_client = None
    if connections is not None:
        http = default_http_module()
        limits = http.Limits(max_connections=connections, max_keepalive_connections=connections)
        timeout = http.Timeout(600.0, connect=CONNECT_TIMEOUT_S)
        http_client = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
    return openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, http_client=http_client)


async def drain(client: openai.AsyncOpenAI, *, limit_s: float = 300.0) -> tuple[bool, float]:
    """Flush `client`'s events until a flush completes (each waits at most the client's
    `drain_timeout`), for at most `limit_s`: (drained, seconds it took). Late events are then told
    apart from lost ones."""
    started = time.perf_counter()
    while True:
        if await moa_stream.flush(client):
            return True, time.perf_counter() - started
        if time.perf_counter() - started > limit_s:
            return False, time.perf_counter() - started


def wrap_client(client: openai.AsyncOpenAI, *, fast: bool = False, **options: Any) -> openai.AsyncOpenAI:
    """`moa_stream.wrap(client, **options)`, with `fast=True` only when asked (and offered)."""
    wrap: Any = moa_stream.wrap  # `fast` is not in every version's signature
    if fast:
        options["fast"] = True
    wrapped: openai.AsyncOpenAI = wrap(client, **options)
    return wrapped


def null_sink(event: moa_stream.Event) -> None:
    """A sink that does nothing: what delivery itself costs."""


# -- statistics -------------------------------------------------------------------------------------


def cpu_row(size_key: str, name: str, row: Mapping[str, Any], extra: str) -> list[str]:
    """One table row of a per-chunk CPU section: size, variant, median, spread, ratio, `extra`, rate."""
    cpu = row["cpu_us_per_chunk"]
    return [
        f"{int(size_key):,}",
        name,
        f"{cpu['median']:.1f}",
        f"{cpu['min']:.1f}-{cpu['max']:.1f}",
        f"{row['cpu_over_bare']:.3f}",
        extra,
        f"{row['chunks_per_s']['median']:,.0f}",
    ]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with the min-max range of `values`."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile (0..1) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rotated(items: Sequence[Any], round_index: int) -> list[Any]:
    """`items` rotated left by `round_index`: round-robin order that moves every round."""
    shift = round_index % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


# -- memory -----------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now (Linux `/proc/self/statm`; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_trim() -> bool:
    """Ask glibc to hand free heap pages back to the OS; False where that is not available.

    RSS that falls after a trim was free memory the allocator kept, not memory still in use."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.malloc_trim(0)
    return True


class RssSampler:
    """Samples RSS every `interval` seconds on a thread while the `with` block runs; `peak` is the
    highest sample (ru_maxrss would be the process's lifetime peak, not this block's)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# -- events -----------------------------------------------------------------------------------------


class EventKey(msgspec.Struct, frozen=True, array_like=True):
    """What the event checks need of one event: its type tag, turn and call ids (small, so that a
    tally of 1,000 turns does not itself weigh on the RSS figures)."""

    kind: str
    turn_id: str
    call_id: str | None = None
    calls: int | None = None
    """For a `TurnEnd`: how many calls the turn made."""


class EventTally:
    """A sink that keeps the key of every event it receives, and the aggregator gap of each trace."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.keys: list[EventKey] = []
        self.waits: dict[str, list[float]] = {}
        """Preset name to the `aggregator_wait_s` of its turns' traces."""

    def __call__(self, event: moa_stream.Event) -> None:
        turn_id: str = getattr(event, "turn_id", "")
        call_id = event.call_id if isinstance(event, moa_stream.CallUsage) else None
        calls = event.calls if isinstance(event, moa_stream.TurnEnd) else None
        key = EventKey(kind=type(event).__name__, turn_id=turn_id, call_id=call_id, calls=calls)
        with self._lock:
            self.keys.append(key)
            if isinstance(event, moa_stream.TurnTrace) and event.aggregator_wait_s is not None:
                self.waits.setdefault(event.preset or "", []).append(event.aggregator_wait_s)

    def clear(self) -> None:
        with self._lock:
            self.keys = []
            self.waits = {}


def check_turn_events(keys: Iterable[EventKey], *, turns: int, calls_per_turn: int) -> dict[str, Any]:
    """Whether `turns` turns each produced exactly `calls_per_turn` `CallUsage` with distinct call
    ids, one `TurnEnd` and one `TurnTrace`.

    `lost` counts events that never arrived: a turn's end or trace, or the usage of a call that its
    `TurnEnd` counts; `duplicated` counts events that arrived more than once (or usage beyond the
    turn's calls). A turn whose `TurnEnd` counts another number of calls than `calls_per_turn` (a MoA
    turn that failed before its aggregator call) is an `odd_turn`: its events are all there, the
    turn itself is not what was asked for."""
    usage: dict[str, list[str]] = {}
    ends: dict[str, list[int | None]] = {}
    traces: dict[str, int] = {}
    call_ids: dict[str, int] = {}
    for key in keys:
        if key.kind == "CallUsage":
            usage.setdefault(key.turn_id, []).append(key.call_id or "")
            call_ids[key.call_id or ""] = call_ids.get(key.call_id or "", 0) + 1
        elif key.kind == "TurnEnd":
            ends.setdefault(key.turn_id, []).append(key.calls)
        elif key.kind == "TurnTrace":
            traces[key.turn_id] = traces.get(key.turn_id, 0) + 1
    turn_ids = set(usage) | set(ends) | set(traces)
    lost = duplicated = odd_turns = 0
    for turn_id in turn_ids:
        reported = [n for n in ends.get(turn_id, []) if n is not None]
        made = reported[0] if reported else calls_per_turn
        odd_turns += made != calls_per_turn
        calls = usage.get(turn_id, [])
        distinct = len(set(calls))
        lost += max(0, made - distinct)
        duplicated += len(calls) - distinct + max(0, distinct - made)
        for seen in (len(ends.get(turn_id, [])), traces.get(turn_id, 0)):
            lost += max(0, 1 - seen)
            duplicated += max(0, seen - 1)
    # A turn that left no event at all is lost whole: its calls, its end and its trace.
    missing_turns = max(0, turns - len(turn_ids))
    lost += missing_turns * (calls_per_turn + 2)
    extra_turns = max(0, len(turn_ids) - turns)
    return {
        "turns_expected": turns,
        "turns_seen": len(turn_ids),
        "extra_turns": extra_turns,
        "odd_turns": odd_turns,
        "call_usage": sum(len(calls) for calls in usage.values()),
        "turn_end": sum(len(counts) for counts in ends.values()),
        "turn_trace": sum(traces.values()),
        "reused_call_ids": sum(1 for count in call_ids.values() if count > 1),
        "lost": lost,
        "duplicated": duplicated,
        "ok": lost == 0 and duplicated == 0 and extra_turns == 0 and odd_turns == 0,
    }


# -- output -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class SectionResult:
    """What a section returns: its table, its machine-readable results, and notes for the reader."""

    section: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    results: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


_FIGURE = re.compile(r"[-+\d.,/() ]*")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The same table in GitHub Markdown (for the README): columns of figures right-aligned."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in headers]
    align = ["---:" if all(_FIGURE.fullmatch(str(cell)) for cell in column) else "---" for column in columns]
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [headers, align, *rows])


def print_section(result: SectionResult) -> None:
    print(f"\n== {result.title} ({result.section}, {result.elapsed_s:.0f} s) ==")
    print(format_table(result.headers, result.rows))
    for note in result.notes:
        print(f"note: {note}")


def source_revision() -> str | None:
    """The checkout's commit, with `+dirty` when the package's files differ from it."""
    root = Path(moa_stream.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "moa_stream")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Where the figures come from: versions, machine, date, the package's commit."""
    return {
        "moa_stream": source_revision(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "openai": openai.__version__,
        "http": default_http_module().__name__,
        "msgspec": msgspec.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "fast_mode": has_fast_mode(),
    }


def write_json(result: SectionResult, out_dir: Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `<out_dir>/<section>.json`: the environment, the config, the table and the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.section}.json"
    document = {
        "section": result.section,
        "title": result.title,
        "environment": environment(),
        **(extra or {}),
        "config": result.config,
        "elapsed_s": result.elapsed_s,
        "table": {"headers": result.headers, "rows": result.rows},
        "notes": result.notes,
        "results": result.results,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or None without matplotlib (the `bench` extra)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def save_figure(plt: Any, figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -- configuration and sections ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes and round counts of a run: `Config.full()` for the README's figures, `Config.quick()`
    for a check in well under a minute (the tests shrink it further)."""

    quick: bool = False
    chunk_sizes: tuple[int, ...] = (10, 100, 1_000, 10_000)
    chunk_rounds: int = 9
    chunk_target: int = 2_000
    """Chunks per sample: a 10-chunk sample is 200 streams back to back, a 10,000-chunk one is one."""
    sink_sizes: tuple[int, ...] = (100, 1_000)
    sink_rounds: int = 9
    stream_levels: tuple[int, ...] = (1, 10, 100, 1_000)
    moa_levels: tuple[int, ...] = (1, 10, 100, 1_000)
    concurrency_chunks: int = 20
    concurrency_streams: int = 200
    """Streams (or turns) per round at least: below that, each of the concurrent workers runs several."""
    concurrency_rounds: int = 2
    round_timeout_s: float = 180.0
    fanout_levels: tuple[int, ...] = (1, 10)
    fanout_turns: int = 300
    fanout_rounds: int = 5
    call_levels: tuple[int, ...] = (1, 32)
    """Calls in flight for the per-call section."""
    call_rounds: int = 5
    calls_per_sample: int = 60
    moa_turns: int = 20
    """MoA turns per sample of the per-call section's MoA share."""

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick_run(cls) -> Config:
        return cls(
            quick=True,
            chunk_sizes=(10, 100, 1_000),
            chunk_rounds=3,
            chunk_target=500,
            sink_sizes=(100,),
            sink_rounds=3,
            stream_levels=(1, 10, 100),
            moa_levels=(1, 10, 100),
            concurrency_streams=50,
            concurrency_rounds=1,
            round_timeout_s=30.0,
            fanout_turns=30,
            fanout_rounds=1,
            call_rounds=2,
            calls_per_sample=20,
            moa_turns=5,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of the suite: the simulator models it needs, its run, and its plot."""

    name: str
    title: str
    models: Callable[[Config], list[SimModel]]
    run: Callable[[str, Config, Path], Coroutine[Any, Any, SectionResult]]
    """(simulator base URL, config, a scratch directory for trace files) to the section's result."""
    plot: Callable[[SectionResult, Any], Any]
    """(result, pyplot) to a matplotlib figure."""
