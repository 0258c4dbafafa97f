"""Load: concurrent MoA turns for a fixed time with injected faults; no event lost or duplicated.

Keeps `--turns` MoA turns (3 references + aggregator) in flight against the in-process simulator for
`--seconds`, injecting a fault into `--fault-rate` of the upstream requests (HTTP 500 or 429,
disconnect, malformed chunk, in-stream error); then lets the turns in flight finish and drains the
sinks. `TurnChecker` checks every event as it arrives and holds only the turns not complete yet, so
the run's own bookkeeping does not grow with its length: what memory grows is the library's (with
the SDK and the simulator, in the same process).

Every `--round-seconds`, after a flush and a `gc.collect()`, it prints a row: turns started,
completed and open, what the checker holds, RSS, the objects the collector tracks
(`len(gc.get_objects())`: containers and instances, not str or int) and the blocks pymalloc has
allocated (`sys.getallocatedblocks()`: every small object). The collection pauses the event loop for
the `gc ms` column; tracemalloc would slow every allocation, so it is not used. At the end: how RSS,
objects and blocks moved from the first row to the last (the same turns in flight, so the change is
per turn run), and whether every check passed. With more turns in flight than the machine keeps
up with, rows come later than asked (the loop runs every ready task before it looks at the clock,
and the flush waits for the sinks' backlog), so the run lasts longer than `--seconds`; `t s` says
when each row was taken.
Run: `.venv/bin/python -m benchmarks.load [--seconds 60 --turns 1000 --fault-rate 0.05 --json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import random
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio

import moa_stream
from moa_stream import Preset
from moa_stream.testing import SimModel, Simulator, sim_client

from ._common import drain, rss_bytes

FAULTS = ("http_500;after=0", "http_429;after=0", "disconnect;after=3", "malformed;after=2", "stream_error;after=2")
MIB = 2**20


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


# -- the checker ------------------------------------------------------------------------------------


def question(number: int) -> str:
    """The user message of turn `number`: what names the turn in its `TurnTrace`."""
    return f"load turn {number}"


_QUESTION = re.compile(r"load turn (\d+)")

PROBLEMS = (
    "duplicated TurnEnd",
    "duplicated TurnTrace",
    "reused call id",
    "CallUsage not in its trace",
    "TurnEnd and TurnTrace disagree",
    "turn traced twice",
    "unknown turn",
)
"""What `TurnChecker` counts as events arrive, in the order of its docstring."""


class _Turn:
    """What has arrived of one turn id whose events are not all in."""

    __slots__ = ("end", "manifest", "name", "reported", "traced_end")

    def __init__(self) -> None:
        self.end: moa_stream.TurnEnd | None = None
        self.traced_end: moa_stream.TurnEnd | None = None
        """The `end` of its `TurnTrace`, to compare with its `TurnEnd` whichever comes first."""
        self.manifest: frozenset[str] | None = None
        """The call ids its `TurnTrace` lists; None until the trace arrives."""
        self.name: int | None = None
        """The started turn its trace names, once that is one no other trace named."""
        self.reported: set[str] = set()
        """The call ids of its `CallUsage` events."""


class TurnChecker:
    """The load run's sink: every started turn exactly once, holding only the turns not complete.

    `start()` numbers each turn the run starts; the turn's user message, `question(number)`, is in
    the calls its `TurnTrace` records, so the trace names the turn. `CallUsage` and `TurnEnd` carry
    only the turn id, which the trace ties to the number. Events gather by turn id, in any order,
    until the turn is complete: its `TurnEnd`, a trace naming a started turn, and a `CallUsage` for
    every call the trace lists. Then the entry is dropped and `completed` counts one.

    As events arrive it counts (`PROBLEMS`): a second `TurnEnd` or `TurnTrace` of an open turn id;
    a `CallUsage` whose call id its turn already reported (or a trace listing a call twice); one the
    trace does not list; a trace whose `end` is not the `TurnEnd` or counts other calls than it
    lists; a trace naming a turn another trace named; a trace naming no started turn. An event of a
    turn already complete opens an entry that can never complete (its trace would name a turn
    already named), as does every event of a turn that lacks one: after the drain, nothing may be
    left (`finish()`). Every started turn then completed once, with exactly its events.

    It holds an entry per turn id whose events have begun to arrive and are not all in, and the
    numbers of started turns no trace has named yet: while nothing is lost, turns in flight or with
    events still in the sink's buffer (at most 10,000 events by default), not the turns run.
    Call ids are checked within their turn only. They come from `moa_stream._ids.new_id()`: 128 bits
    drawn from one Mersenne Twister per process (seeded from the OS, reseeded in a forked child; this
    run does not fork), whose period of 2**19937 - 1 and statistical quality make a repeat no likelier
    than for random bits: about n**2 / 2**129 for n ids, 1e-25 for ten million. So a call id reported
    twice is a duplicated event, and it carries its own turn id: counted above while the turn is
    open, left over if it comes after the turn completed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = 0
        self._unnamed: set[int] = set()
        self._turns: dict[str, _Turn] = {}
        self.completed = 0
        self.max_held = 0
        """The most entries (turn ids open, unnamed turns) held at once."""
        self.kinds: collections.Counter[str] = collections.Counter()
        """Events received, by type."""
        self.problems: collections.Counter[str] = collections.Counter()
        """Problems counted as events arrived, by name (`PROBLEMS`)."""

    def start(self) -> int:
        """Register a new turn; its number (its user message is `question(number)`)."""
        with self._lock:
            number = self._started
            self._started += 1
            self._unnamed.add(number)
            return number

    def __call__(self, event: moa_stream.Event) -> None:
        with self._lock:
            self.kinds[type(event).__name__] += 1
            if not isinstance(event, moa_stream.CallUsage | moa_stream.TurnEnd | moa_stream.TurnTrace):
                return
            turn = self._turns.get(event.turn_id)
            if turn is None:
                turn = self._turns[event.turn_id] = _Turn()
            if isinstance(event, moa_stream.CallUsage):
                self._usage(turn, event.call_id)
            elif isinstance(event, moa_stream.TurnEnd):
                self._end(turn, event)
            else:
                self._trace(turn, event)
            if (
                turn.end is not None
                and turn.name is not None
                and turn.manifest is not None
                and turn.manifest <= turn.reported
            ):
                del self._turns[event.turn_id]
                self.completed += 1
            self.max_held = max(self.max_held, len(self._turns) + len(self._unnamed))

    def _usage(self, turn: _Turn, call_id: str) -> None:
        if call_id in turn.reported:
            self.problems["reused call id"] += 1
        elif turn.manifest is not None and call_id not in turn.manifest:
            self.problems["CallUsage not in its trace"] += 1
        turn.reported.add(call_id)

    def _end(self, turn: _Turn, end: moa_stream.TurnEnd) -> None:
        if turn.end is not None:
            self.problems["duplicated TurnEnd"] += 1
            return
        turn.end = end
        if turn.traced_end is not None and turn.traced_end != end:
            self.problems["TurnEnd and TurnTrace disagree"] += 1

    def _trace(self, turn: _Turn, trace: moa_stream.TurnTrace) -> None:
        if turn.manifest is not None:
            self.problems["duplicated TurnTrace"] += 1
            return
        turn.manifest = frozenset(call.usage.call_id for call in trace.calls)
        self.problems["reused call id"] += len(trace.calls) - len(turn.manifest)
        self.problems["CallUsage not in its trace"] += len(turn.reported - turn.manifest)
        turn.traced_end = trace.end
        # Two ways to disagree, each counted once: the trace's calls against its own `end`, and that
        # `end` against the `TurnEnd` event (compared by whichever of the two arrives second).
        if trace.end.calls != len(trace.calls):
            self.problems["TurnEnd and TurnTrace disagree"] += 1
        if turn.end is not None and turn.end != trace.end:
            self.problems["TurnEnd and TurnTrace disagree"] += 1
        number = _named_turn(trace)
        if number is None or number >= self._started:
            self.problems["unknown turn"] += 1
        elif number not in self._unnamed:
            self.problems["turn traced twice"] += 1
        else:
            self._unnamed.remove(number)
            turn.name = number

    def snapshot(self) -> dict[str, int]:
        """Turns started, completed and open (started, not complete), and what the checker holds:
        turn ids open, turns no trace named yet, and the call ids in the open entries."""
        with self._lock:
            return {
                "started": self._started,
                "completed": self.completed,
                "open": self._started - self.completed,
                "turn_ids": len(self._turns),
                "unnamed": len(self._unnamed),
                "held": len(self._turns) + len(self._unnamed),
                "call_ids": sum(len(t.reported) + len(t.manifest or ()) for t in self._turns.values()),
            }

    def finish(self) -> dict[str, Any]:
        """The verdict, once no turn is in flight and the sinks are drained: the problems counted,
        and what is left (which must be nothing): turns no trace named, and turn ids whose events
        are not all in, by what they lack."""
        with self._lock:
            left = list(self._turns.values())
            return {
                "turns_started": self._started,
                "turns_completed": self.completed,
                "turns_unnamed": len(self._unnamed),
                "turn_ids_left": len(left),
                "without_turn_end": sum(t.end is None for t in left),
                "without_trace": sum(t.manifest is None for t in left),
                "call_usage_missing": sum(len(t.manifest - t.reported) for t in left if t.manifest is not None),
                "max_held": self.max_held,
                "problems": {name: self.problems[name] for name in PROBLEMS},
                "events": dict(self.kinds),
            }


def _named_turn(trace: moa_stream.TurnTrace) -> int | None:
    """The turn number that the last user message of the trace's first call names."""
    if not trace.calls:
        return None
    for message in reversed(trace.calls[0].input_messages):
        if isinstance(message, dict) and message.get("role") == "user":
            match = _QUESTION.fullmatch(str(message.get("content")))
            return int(match[1]) if match else None
    return None


def checks(verdict: dict[str, Any], *, upstream_requests: int, sink_dropped: int, sink_failed: int) -> dict[str, bool]:
    """The run's checks, by name: `verdict` is `TurnChecker.finish()` after the drain, with the
    requests the upstream received and the events the sinks dropped or raised on."""
    problems = verdict["problems"]
    once = ("duplicated TurnEnd", "duplicated TurnTrace", "TurnEnd and TurnTrace disagree", "turn traced twice")
    return {
        "every started turn completed once: one TurnEnd, one TurnTrace, a CallUsage per call": (
            verdict["turns_completed"] == verdict["turns_started"]
            and not any(problems[name] for name in (*once, "unknown turn"))
        ),
        "every CallUsage a distinct call id that its turn's trace lists": (
            problems["reused call id"] == 0 and problems["CallUsage not in its trace"] == 0
        ),
        "one CallUsage per upstream request": verdict["events"].get("CallUsage", 0) == upstream_requests,
        "no event dropped or failed by a sink": sink_dropped == 0 and sink_failed == 0,
        "nothing left after the drain": verdict["turns_unnamed"] == 0 and verdict["turn_ids_left"] == 0,
    }


# -- the run ----------------------------------------------------------------------------------------


def memory() -> dict[str, float]:
    """RSS (MiB), live gc-tracked objects and pymalloc blocks, after a full collection."""
    gc.collect()
    return {"rss_mib": rss_bytes() / MIB, "objects": len(gc.get_objects()), "blocks": sys.getallocatedblocks()}


COLUMNS = (
    ("t s", "t_s", "{:.1f}"),
    ("started", "started", "{:,}"),
    ("completed", "completed", "{:,}"),
    ("open", "open", "{:,}"),
    ("held", "held", "{:,}"),
    ("call ids", "call_ids", "{:,}"),
    ("RSS MiB", "rss_mib", "{:.1f}"),
    ("objects", "objects", "{:,}"),
    ("blocks", "blocks", "{:,}"),
    ("gc ms", "gc_ms", "{:.0f}"),
)
"""The per-round table: header, row key, format."""
WIDTH = 11


def table_line(cells: list[str]) -> str:
    return "".join(cell.rjust(WIDTH) for cell in cells)


async def run(*, seconds: float, turns: int, fault_rate: float, round_seconds: float) -> dict[str, Any]:
    """Run the load, printing a row per round; return the figures: rounds, checks, memory."""
    models = [SimModel(name=f"ref-{i}", reply_tokens=20) for i in range(3)] + [SimModel(name="agg", reply_tokens=20)]
    sim = FaultySimulator(models, fault_rate, seed=1)
    checker = TurnChecker()
    preset = Preset(references=["ref-0", "ref-1", "ref-2"], aggregator="agg", cadence="per_call", reference_timeout=30)
    before = memory()
    client = moa_stream.wrap(
        sim_client(sim, max_retries=0), sinks=[checker], presets={"load": preset}, upstream_concurrency=3 * turns
    )
    began = anyio.current_time()
    stop = anyio.Event()
    caller_errors = 0
    rounds: list[dict[str, Any]] = []

    async def worker() -> None:
        nonlocal caller_errors
        while not stop.is_set():
            content = question(checker.start())
            try:
                stream = await client.chat.completions.create(
                    model="moa:load", messages=[{"role": "user", "content": content}], stream=True
                )
                async for _ in stream:
                    pass
            except Exception:
                caller_errors += 1  # an aggregator fault reaches the caller, as it would from the bare SDK

    async def report() -> None:
        # The last row is taken before the workers stop, with as many turns in flight as the first:
        # the two compare the same load, many turns apart.
        print(table_line([header for header, _, _ in COLUMNS]), flush=True)
        count = max(1, round(seconds / round_seconds))
        for tick in range(1, count + 1):
            await anyio.sleep_until(began + seconds * tick / count)
            await moa_stream.flush(client)
            collecting = time.perf_counter()
            row: dict[str, Any] = {"t_s": anyio.current_time() - began, **memory()}
            row["gc_ms"] = (time.perf_counter() - collecting) * 1000
            row |= checker.snapshot()
            rounds.append(row)
            print(table_line([template.format(row[key]) for _, key, template in COLUMNS]), flush=True)
        stop.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(report)
        for _ in range(turns):
            tasks.start_soon(worker)
    drained, drain_s = await drain(client)
    await client.close()
    after = memory()
    verdict = checker.finish()
    stats = moa_stream.sink_stats(client)
    dropped, failed = sum(s.dropped for s in stats), sum(s.failed for s in stats)
    return {
        "config": {"seconds": seconds, "turns": turns, "fault_rate": fault_rate, "round_seconds": round_seconds},
        "caller_errors": caller_errors,
        "upstream_requests": sim.stats.requests,
        "faults_injected": sim.faults,
        "sink_dropped": dropped,
        "sink_failed": failed,
        "drained": drained,
        "drain_s": drain_s,
        "checker": verdict,
        "checks": checks(verdict, upstream_requests=sim.stats.requests, sink_dropped=dropped, sink_failed=failed),
        "memory_before_client": before,
        "memory_after_close": after,
        "rounds": rounds,
        "growth": growth(rounds),
    }


def growth(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How RSS, objects and blocks moved from the first round to the last, and over how many turns
    completed in between; None with fewer than two rounds."""
    if len(rounds) < 2:
        return None
    first, last = rounds[0], rounds[-1]
    turns = last["completed"] - first["completed"]
    moved = {key: last[key] - first[key] for key in ("rss_mib", "objects", "blocks")}
    return {"turns": turns, **moved, "rss_bytes_per_turn": moved["rss_mib"] * MIB / turns if turns else None}


def summary(result: dict[str, Any]) -> list[str]:
    """The lines printed after the table."""
    verdict, before, after = result["checker"], result["memory_before_client"], result["memory_after_close"]
    problems = ", ".join(f"{name} {count}" for name, count in verdict["problems"].items() if count) or "none"
    events = ", ".join(f"{kind} {count:,}" for kind, count in sorted(verdict["events"].items()))
    lines = [
        f"turns: {verdict['turns_started']:,} started, {verdict['turns_completed']:,} completed, "
        f"{result['caller_errors']:,} ended in an error for the caller",
        f"upstream requests: {result['upstream_requests']:,} ({result['faults_injected']:,} faults injected); "
        f"events: {events}",
        f"sinks: {result['sink_dropped']} dropped, {result['sink_failed']} failed; problems seen: {problems}",
        f"checker: at most {verdict['max_held']:,} entries held ({result['config']['turns']:,} turns in flight); "
        f"after the drain ({result['drain_s']:.1f} s): {verdict['turns_unnamed']} turns unnamed, "
        f"{verdict['turn_ids_left']} turn ids left",
    ]
    moved = result["growth"]
    if moved is None:
        lines.append("growth: fewer than two rounds, nothing to compare")
    else:
        per_turn = moved["rss_bytes_per_turn"]
        lines.append(
            f"growth from the first round to the last ({moved['turns']:,} turns completed in between): "
            f"RSS {moved['rss_mib']:+.1f} MiB"
            + (f" ({per_turn:+,.0f} B per turn)" if per_turn is not None else "")
            + f", live objects {moved['objects']:+,}, blocks {moved['blocks']:+,}"
        )
    lines.append(
        f"before the client: RSS {before['rss_mib']:.1f} MiB, {before['objects']:,} objects, "
        f"{before['blocks']:,} blocks; after close: RSS {after['rss_mib']:.1f} MiB, "
        f"{after['objects']:,} objects, {after['blocks']:,} blocks"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to keep starting turns")
    parser.add_argument("--turns", type=int, default=1000, help="MoA turns in flight")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of upstream requests given a fault")
    parser.add_argument("--round-seconds", type=float, default=10.0, help="seconds between table rows")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to this file")
    args = parser.parse_args()
    result = asyncio.run(
        run(seconds=args.seconds, turns=args.turns, fault_rate=args.fault_rate, round_seconds=args.round_seconds)
    )
    for line in summary(result):
        print(line)
    for name, ok in result["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    raise SystemExit(0 if all(result["checks"].values()) else 1)


if __name__ == "__main__":
    main()
