"""`moa-stream traces`: look at trace files: a row per turn (`list`), one turn side by side (`show`) or
totals over a directory (`stats`).

Reads what `TraceWriter` wrote, through `read_traces`; nothing here writes. Bad input (a missing or
unreadable file, a line that is not a trace record, a `--turn` that names no turn or several) is
reported on stderr with the file and line, and the command exits 1. A directory's unreadable file is
reported and skipped: the command prints what the other files hold, then exits 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import TextIO

import msgspec

from .._events import CallRecord, TurnTrace, event_encoder
from ._text import PROG, BadInput, cut, plural, printable, secs, usd, when
from ._text import tokens as token_text
from ._trace_json import envelope, turn_json, write_json
from ._trace_list import list_command
from ._trace_select import Gathered, Turn, add_filters, add_json, gather, no_turns, reason, refused
from ._trace_stats import stats_command

_MIN_COLUMN = 24
"""Narrowest column for side-by-side references; below it they are stacked."""
_GAP = " | "
_DEFAULT_LINES = 8


def add_traces_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `traces list`, `traces show` and `traces stats` to the `moa-stream` subcommands."""
    traces = commands.add_parser(
        "traces",
        help="look at trace files: a list of turns, one turn, or totals",
        description="Look at the trace files written with trace_dir=: a list of turns, one turn side by side, "
        "or totals. Every subcommand takes --since and --session filters and prints JSON with --json.",
    )
    sub = traces.add_subparsers(dest="traces_command", required=True, metavar="{list,show,stats}")
    listing = sub.add_parser(
        "list",
        help="one row per turn: id, time, session, model, status, calls, tokens, cost, duration",
        description="One row per turn of a trace file or of every *.jsonl file of a directory, oldest first "
        "(by start time, in UTC): turn id, start, session, requested model or preset, status (refused: "
        "refused before any call was sent), calls, tokens, cost, duration, and why a failed turn failed.",
    )
    listing.add_argument("path", type=Path, metavar="DIR|FILE", help="a trace directory or a <session>.jsonl file")
    add_filters(listing)
    add_json(listing)
    show = sub.add_parser(
        "show",
        help="print one turn: the references side by side, then the aggregator's answer",
        description="Print one turn of a trace file or directory (default: the one that started last): a "
        "header with the totals and, for a failed or refused turn, the reason; the references side by side "
        "with status, tokens, cost and timing; then the aggregator's answer.",
    )
    show.add_argument("path", type=Path, metavar="DIR|FILE", help="a trace directory or a <session>.jsonl file")
    which = show.add_mutually_exclusive_group()
    which.add_argument("--turn", metavar="ID", help="the turn to show: its id or a unique prefix of it")
    which.add_argument(
        "--last", action="store_true", help="the turn that started last (the default; the last row of `list`)"
    )
    show.add_argument(
        "--lines",
        type=positive,
        default=_DEFAULT_LINES,
        metavar="N",
        help=f"lines of each reference's answer to show (default {_DEFAULT_LINES})",
    )
    add_filters(show)
    add_json(show)
    stats = sub.add_parser(
        "stats",
        help="total cost and tokens by model, session, requested model and role",
        description="Total turns, calls, tokens, tool calls and cost over every *.jsonl file of a trace directory, "
        "by model, by session, by what the caller asked for and by role; each table adds up to the totals. "
        "With --prices, what the same calls would have cost under another price table.",
    )
    stats.add_argument("directory", type=Path, metavar="DIR", help="a trace directory")
    stats.add_argument(
        "--prices",
        type=Path,
        metavar="FILE",
        help="a price table in LiteLLM's format (model_prices_and_context_window.json or a subset): "
        "re-price the recorded usage and show that cost beside the recorded one, per model and in total",
    )
    add_filters(stats)
    add_json(stats)


def run_traces(args: argparse.Namespace) -> int:
    """Run a `traces` subcommand from parsed arguments; 1 for bad input or an unreadable file, else 0."""
    out, err = sys.stdout, sys.stderr
    command = getattr(args, "traces_command", None)
    try:
        if command == "list":
            return list_command(args, out, err)
        if command == "show":
            return _show(args, out, err)
        if command == "stats":
            return stats_command(args, out, err)
        raise BadInput(f"unknown command {command!r} (expected list, show or stats)")
    except BadInput as exc:
        print(f"{PROG}: {exc}", file=err)
        return 1
    except BrokenPipeError:  # `moa-stream traces show FILE | head`: the reader left, nothing is wrong
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    # Python flushes stdout again at exit, which would raise once more on the closed pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured output): nothing to silence
        pass
    finally:
        os.close(devnull)


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


# -- show ---------------------------------------------------------------------------------------


def _show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    since, sessions = args.since, args.session
    gathered = gather(args.path, err, since=since, sessions=sessions)
    turns = gathered.turns
    if not turns:
        raise BadInput(no_turns(gathered, since, sessions))
    prefix: str | None = args.turn
    turn = turns[-1] if prefix is None else _find(gathered, prefix)
    if args.json:
        document = envelope("show", gathered, since, sessions)
        document["turn"] = turn_json(turn)
        # Through msgspec, which writes a non-finite float as null: the record as the file has it.
        document["trace"] = msgspec.json.decode(event_encoder.encode(turn.record))
        write_json(document, out)
    else:
        width = max(40, shutil.get_terminal_size((100, 24)).columns)
        lines = render_turn(turn.record, width, args.lines)
        if gathered.is_directory:
            lines = _field("file", str(turn.path), width) + lines
        out.write("\n".join(lines) + "\n")
    return 1 if gathered.skipped else 0


def _find(gathered: Gathered, prefix: str) -> Turn:
    turns = gathered.turns
    ids = list(dict.fromkeys(t.record.turn_id for t in turns if t.record.turn_id.startswith(prefix)))
    where = " in the file" if not gathered.is_directory else f" in {plural(gathered.files, 'file')}"
    if not ids:
        raise BadInput(f"{gathered.source}: no turn id starts with {prefix!r} ({plural(len(turns), 'turn')}{where})")
    if len(ids) > 1:
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise BadInput(f"{gathered.source}: {prefix!r} matches {len(ids)} turns ({shown}); give more of the id")
    return next(t for t in turns if t.record.turn_id == ids[0])


def render_turn(record: TurnTrace, width: int, lines: int) -> list[str]:
    end = record.end
    was_refused = refused(record)
    model = record.model
    if record.preset is not None:
        model += f"  (preset {record.preset}"
        # A refused turn records the cadence it would have had; nothing was reused or run.
        if record.cadence is not None and not was_refused:
            model += ", references " + ("reused: cadence hit" if record.cadence == "hit" else "run: cadence miss")
        model += ")"
    failed = f", {end.failed_calls} failed" if end.failed_calls else ""
    status: str = end.status + (" (refused: no call was sent)" if was_refused else "")
    timing = [f"started {when(end.started_at)}", f"ttft {secs(end.ttft_s)}", f"took {secs(end.duration_s)}"]
    if record.aggregator_wait_s is not None:
        timing.append(f"aggregator waited {secs(record.aggregator_wait_s)}")
    tokens = f"input {end.input_tokens:,}"
    if any(c.usage.cached_input_tokens is not None for c in record.calls):
        tokens += f" (cached {end.cached_input_tokens:,})"
    tokens += f"  output {end.output_tokens:,}"
    if any(c.usage.reasoning_tokens is not None for c in record.calls):
        tokens += f" (reasoning {end.reasoning_tokens:,})"
    if not end.usage_complete:
        missing = sum(c.usage.usage_source == "missing" for c in record.calls)
        tokens += f"  [lower bound: usage missing for {plural(missing, 'call')}]"
    if any(c.usage.usage_source == "estimated" for c in record.calls):
        tokens += "  (~ marks estimates: the upstream reported no usage for that call)"
    cost = usd(end.cost_usd)
    if not end.cost_complete:
        unknown = sum(c.usage.cost_usd is None for c in record.calls)
        cost += f"  [lower bound: no known price for {plural(unknown, 'call')}]"
    text: list[str] = []
    for name, value in (
        ("turn", record.turn_id),
        ("session", record.session_id),
        ("model", model),
        ("status", f"{status}  ({plural(end.calls, 'call')}{failed})  " + "  ".join(timing)),
        *([("reason", why)] if (why := reason(record)) else []),
        ("tokens", tokens),
        ("cost", cost),
    ):
        text.extend(_field(name, value, width))

    references = [c for c in record.calls if c.role == "reference"]
    others = [c for c in record.calls if c.role != "reference"]
    if record.preset is not None:
        text.append("")
        if references:
            text.append(_rule(f"references ({len(references)})", width))
            text.extend(_side_by_side(references, width, lines))
        elif was_refused:
            text.append(_rule("references", width))
            text.append("none ran: the turn was refused")
        elif record.cadence == "hit":
            text.append(_rule("references", width))
            text.append("reused from an earlier call of the same user turn (not part of this turn)")
        else:
            text.append(_rule("references", width))
            text.append("none ran")
    for call in others:
        text.append("")
        name = "aggregator" if call.role == "aggregator" else "call"
        text.append(_rule(f"{name} {_title(call)}", width))
        text.extend(_pack(_facts(call), width))
        text.append("")
        text.extend(_wrap(_answer(call), width))
    return text


def _side_by_side(calls: list[CallRecord], width: int, lines: int) -> list[str]:
    column = (width - len(_GAP) * (len(calls) - 1)) // len(calls)
    if column < _MIN_COLUMN:
        return _stacked(calls, width, lines)
    blocks = [_column(call, column, lines) for call in calls]
    height = max(len(block) for block in blocks)
    rows = []
    for index in range(height):
        cells = [(block[index] if index < len(block) else "").ljust(column) for block in blocks]
        rows.append(_GAP.join(cells).rstrip())
    return rows


def _column(call: CallRecord, width: int, lines: int) -> list[str]:
    facts = [_title(call), *_facts(call)]
    return [cut(fact, width) for fact in facts] + ["-" * width] + _excerpt(_answer(call), width, lines)


def _stacked(calls: list[CallRecord], width: int, lines: int) -> list[str]:
    rows: list[str] = []
    for index, call in enumerate(calls):
        if index:
            rows.append("")
        rows.append(cut(f"[{index + 1}] {_title(call)}", width))
        rows.extend(_pack(_facts(call), width))
        rows.extend(_excerpt(_answer(call), width, lines))
    return rows


def _title(call: CallRecord) -> str:
    return call.label if call.label == call.model else f"{call.label} ({call.model})"


def _facts(call: CallRecord) -> list[str]:
    usage = call.usage
    status: str = usage.status
    if status == "error" and usage.http_status is not None and usage.http_status >= 400:
        status += f" (HTTP {usage.http_status})"
    mark = "~" if usage.usage_source == "estimated" else ""
    tokens = f"in {token_text(usage.input_tokens, mark)}"
    if usage.cached_input_tokens:
        tokens += f" ({usage.cached_input_tokens:,} cached)"
    tokens += f" / out {token_text(usage.output_tokens, mark)}"
    if usage.reasoning_tokens:
        tokens += f" ({usage.reasoning_tokens:,} reasoning)"
    cost = usd(usage.cost_usd) if usage.cost_usd is not None else "cost unknown"
    return [status, tokens, cost, f"ttft {secs(usage.ttft_s)}", f"took {secs(usage.duration_s)}"]


def _answer(call: CallRecord) -> str:
    output = call.output
    parts = []
    if call.usage.status == "error" and call.usage.error:
        parts.append(f"[error] {call.usage.error}")
    if output.refusal:
        parts.append(f"[refusal] {output.refusal}")
    if output.text:
        parts.append(output.text)
    for tool in output.tool_calls:
        parts.append(f"[tool call] {tool.name or '?'}({tool.arguments})")
    if not parts:
        parts.append("(no output)")
    return printable("\n".join(parts))


def _excerpt(text: str, width: int, lines: int) -> list[str]:
    wrapped = _wrap(text, width)
    if len(wrapped) <= lines:
        return wrapped
    more = len(wrapped) - lines + 1
    return [*wrapped[: lines - 1], cut(f"... {plural(more, 'more line')}", width)]


def _wrap(text: str, width: int) -> list[str]:
    rows: list[str] = []
    for paragraph in text.splitlines() or [""]:
        rows.extend(textwrap.wrap(paragraph, width, break_long_words=True, replace_whitespace=False) or [""])
    return rows


# Model output is untrusted: control characters (terminal escapes) are shown, not sent to the terminal.
def _pack(items: list[str], width: int) -> list[str]:
    """`items` two spaces apart, broken into lines between items, never inside one."""
    rows: list[str] = []
    for item in items:
        if rows and len(rows[-1]) + 2 + len(item) <= width:
            rows[-1] += "  " + item
        else:
            rows.append(cut(item, width))
    return rows


def _field(name: str, value: str, width: int) -> list[str]:
    """`name` in a 9-wide gutter, then `value` wrapped under itself."""
    gutter = " " * 9
    return textwrap.wrap(
        printable(value), width, initial_indent=name.ljust(9), subsequent_indent=gutter, break_on_hyphens=False
    ) or [name]


def _rule(title: str, width: int) -> str:
    return cut(f"-- {title} ", width).ljust(width, "-")
