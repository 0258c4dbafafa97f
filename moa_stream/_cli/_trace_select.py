"""Which turns a `traces` command looks at: every record of a file or a directory, filtered and ordered.

`list`, `show` and `stats` all read through `gather`, so that `--since` and `--session` mean the same
thing everywhere and a directory's unreadable file is reported the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import re
import time
from pathlib import Path
from typing import TextIO

from .._events import CallRecord, TurnTrace
from ._text import PROG, BadInput, load, plural


@dataclasses.dataclass(frozen=True, slots=True)
class Turn:
    """One trace record and where it was read: its file and its line order in that file."""

    record: TurnTrace
    path: Path
    index: int


@dataclasses.dataclass(slots=True)
class Gathered:
    """The turns of a file or a directory that pass the filters, oldest first."""

    source: Path
    is_directory: bool
    turns: list[Turn]
    files: int
    """Files read (a directory's unreadable files not included)."""
    skipped: list[tuple[Path, str]]
    """A directory's files that could not be read, with why; the command exits 1 after its output."""
    read: int
    """Turns read before the filters."""


def add_filters(parser: argparse.ArgumentParser) -> None:
    """`--since` and `--session`, the same on every subcommand."""
    parser.add_argument(
        "--since",
        type=since_time,
        metavar="WHEN",
        help="only turns started at or after WHEN: an ISO date or time (2025-06-01, 2025-06-01T14:30, "
        "with an offset or Z; without one it is UTC, as the times shown) or a time ago (90s, 30m, 1h, 2d, 1w)",
    )
    parser.add_argument(
        "--session",
        action="append",
        metavar="ID",
        help="only turns of this session (repeat for several)",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")


_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_time(text: str) -> float:
    """An argparse type: a Unix time from an ISO date/time (naive means UTC) or a time ago (`30m`)."""
    value = text.strip()
    if match := _AGO.fullmatch(value.lower()):
        return time.time() - float(match[1]) * _UNIT_S[match[2]]
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date or time (2025-06-01, 2025-06-01T14:30Z) or a time ago (30m, 1h, 2d), got {text!r}"
        ) from None
    if moment.tzinfo is None:  # the commands show times in UTC, so a time typed from them is UTC too
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def gather(
    path: Path,
    err: TextIO,
    *,
    since: float | None = None,
    sessions: list[str] | None = None,
    directory_only: bool = False,
) -> Gathered:
    """The turns of `path` (a trace file, or every `*.jsonl` of a directory) that pass the filters.

    A file that cannot be read is bad input when it was named; in a directory it is reported on `err`
    and skipped, and `Gathered.skipped` says so.
    """
    is_directory = path.is_dir()
    if is_directory:
        try:
            files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        except OSError as exc:
            raise BadInput(f"{path}: cannot list: {exc.strerror or exc}") from None
        if not files:
            raise BadInput(f"{path}: no *.jsonl trace files")
    elif directory_only:
        raise BadInput(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
    else:
        files = [path]
    turns: list[Turn] = []
    skipped: list[tuple[Path, str]] = []
    for file in files:
        try:
            records = load(file, err)
        except BadInput as exc:
            if not is_directory:
                raise
            print(f"{PROG}: {exc} (file skipped)", file=err)
            skipped.append((file, str(exc)))
            continue
        turns.extend(Turn(record, file, index) for index, record in enumerate(records))
    read = len(turns)
    wanted = set(sessions) if sessions else None
    turns = [
        turn
        for turn in turns
        if (since is None or turn.record.end.started_at >= since)
        and (wanted is None or turn.record.session_id in wanted)
    ]
    # Newest last, by start: concurrent turns are written when they end, so file order is not time order.
    turns.sort(key=lambda turn: (_started(turn.record), str(turn.path), turn.index))
    return Gathered(path, is_directory, turns, len(files) - len(skipped), skipped, read)


def _started(record: TurnTrace) -> float:
    started = record.end.started_at
    return started if math.isfinite(started) else math.inf


def filters_text(since: float | None, sessions: list[str] | None) -> str:
    """What the filters were, for a message that nothing passed them."""
    parts = []
    if since is not None:
        parts.append(f"--since {iso(since)}")
    if sessions:
        parts.append("--session " + ", ".join(sessions))
    return " and ".join(parts)


def no_turns(gathered: Gathered, since: float | None, sessions: list[str] | None) -> str:
    """Why there is nothing to show: no turns at all, or none that pass the filters."""
    if not gathered.read:
        return f"{gathered.source}: no turns in this {'directory' if gathered.is_directory else 'file'}"
    return f"{gathered.source}: {plural(gathered.read, 'turn')}, none matching {filters_text(since, sessions)}"


def iso(timestamp: float) -> str | None:
    """ISO 8601 in UTC, to the second: how times appear in JSON."""
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def refused(record: TurnTrace) -> bool:
    """A turn refused before any call was sent (a budget limit): no call, and status `error`."""
    return not record.calls and record.end.status == "error"


def reason(record: TurnTrace) -> str | None:
    """Why a turn with status `error` failed: its own reason, else its first failed call's."""
    end = record.end
    if end.status != "error":
        return None
    if end.error:
        return end.error
    return next((c.usage.error for c in record.calls if c.usage.status == "error" and c.usage.error), None)


def call_tool_calls(call: CallRecord) -> int:
    """Tool calls a call's answer requested."""
    # Records written before CallUsage.tool_calls existed decode it as 0; their output still lists them.
    return int(getattr(call.usage, "tool_calls", 0) or 0) or len(call.output.tool_calls)


def _acting(record: TurnTrace) -> list[CallRecord]:
    # The caller's answer comes from a direct call or the aggregator, never from a reference.
    return [call for call in record.calls if call.role != "reference"]


def turn_tool_calls(record: TurnTrace) -> int:
    """Tool calls the acting model requested in the turn (`TurnEnd.tool_calls`, or counted from the calls)."""
    return int(getattr(record.end, "tool_calls", 0) or 0) or sum(call_tool_calls(c) for c in _acting(record))


def turn_tool_names(record: TurnTrace) -> list[str]:
    names: list[str] = list(getattr(record.end, "tool_names", None) or [])
    return names or [tool.name or "?" for call in _acting(record) for tool in call.output.tool_calls]


def turn_cache_write_tokens(record: TurnTrace) -> int:
    recorded = int(getattr(record.end, "cache_write_tokens", 0) or 0)
    return recorded or sum(call.usage.cache_write_tokens or 0 for call in record.calls)


def finite(value: float | None) -> float | None:
    """`value` for JSON: None instead of NaN or an infinity, which JSON cannot carry."""
    return value if value is not None and math.isfinite(value) else None
