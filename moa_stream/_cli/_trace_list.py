"""`moa-stream traces list`: one row per turn of a trace file or directory, oldest first."""

from __future__ import annotations

import argparse
import datetime
import shutil
from typing import TextIO

from ._text import cut, plural, printable, usd
from ._trace_json import envelope, turn_json, write_json
from ._trace_select import Gathered, Turn, gather, no_turns, reason, refused

_ID_WIDTH = 12
"""Turn ids are 32 hex digits; 12 of them are unique in any trace directory a person reads, and `show
--turn` takes a prefix. Lengthened when two listed turns do share 12."""
_MIN_REASON = 30


def list_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    since, sessions = args.since, args.session
    gathered = gather(args.path, err, since=since, sessions=sessions)
    if args.json:
        document = envelope("list", gathered, since, sessions)
        document["order"] = "started_at"
        document["turns"] = [turn_json(turn) for turn in gathered.turns]
        write_json(document, out)
    elif gathered.turns:
        # Not a terminal (a pipe, a file) and no $COLUMNS: 0, the reasons are not cut, for grep.
        width = shutil.get_terminal_size((0, 24)).columns
        out.write("\n".join([*_table(gathered.turns, width), "", _footer(gathered)]) + "\n")
    else:
        out.write(no_turns(gathered, since, sessions) + "\n")
    return 1 if gathered.skipped else 0


_HEADER = ["turn", "started (UTC)", "session", "model", "status", "calls", "input", "output", "cost", "took"]
_LEFT = {"turn", "started (UTC)", "session", "model", "status"}


def _table(turns: list[Turn], width: int) -> list[str]:
    """The rows, the reasons cut to `width` (0: not cut)."""
    id_width = _id_width([turn.record.turn_id for turn in turns])
    rows = [_HEADER] + [_row(turn, id_width) for turn in turns]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    reasons = [""] + [reason(turn.record) or "" for turn in turns]
    used = sum(widths) + 2 * len(widths)
    room = max(_MIN_REASON, width - used) if width else None
    lines = []
    for row, why in zip(rows, reasons, strict=True):
        cells = [
            cell.ljust(w) if name in _LEFT else cell.rjust(w)
            for name, cell, w in zip(_HEADER, row, widths, strict=True)
        ]
        if any(reasons):
            cells.append("reason" if row is _HEADER else cut(why, room) if room else printable(why))
        lines.append("  ".join(cells).rstrip())
    return lines


def _row(turn: Turn, id_width: int) -> list[str]:
    record, end = turn.record, turn.record.end
    calls = f"{end.calls:,}" + (f" ({end.failed_calls} failed)" if end.failed_calls else "")
    lower = "" if end.usage_complete else "+"  # some call's usage is missing: the sums are lower bounds
    if end.calls and not end.cost_complete and end.cost_usd == 0:
        cost = "unknown"
    else:
        cost = usd(end.cost_usd) + ("" if end.cost_complete else "+")
    return [
        record.turn_id[:id_width],
        _started(end.started_at),
        cut(record.session_id, 24),
        cut(record.model, 24),
        "refused" if refused(record) else end.status,
        calls,
        f"{end.input_tokens:,}{lower}",
        f"{end.output_tokens:,}{lower}",
        cost,
        f"{end.duration_s:.3f}s",
    ]


def _id_width(ids: list[str]) -> int:
    width = _ID_WIDTH
    while width < max(map(len, ids)) and len({turn_id[:width] for turn_id in ids}) < len(set(ids)):
        width += 4
    return width


def _started(timestamp: float) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _footer(gathered: Gathered) -> str:
    turns = gathered.turns
    notes = []
    refusals = sum(refused(turn.record) for turn in turns)
    if refusals:
        notes.append(f"{refusals} refused")
    errors = sum(turn.record.end.status == "error" for turn in turns) - refusals
    if errors:
        notes.append(f"{errors} failed")
    text = plural(len(turns), "turn") + (f" ({', '.join(notes)})" if notes else "")
    if gathered.is_directory:
        text += f" in {plural(gathered.files, 'file')}"
    if len(turns) < gathered.read:
        text += f" (of {gathered.read:,} read)"
    text += ", oldest first"
    if any(not (t.record.end.usage_complete and t.record.end.cost_complete) for t in turns):
        text += "; + marks a lower bound (usage or price unknown for some call)"
    return text
