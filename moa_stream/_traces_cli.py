"""`moa-stream traces`: look at trace files, one turn side by side (`show`) or totals over a directory (`stats`).

Reads what `TraceWriter` wrote, through `read_traces`; nothing here writes. Bad input (a missing or
unreadable file, a line that is not a trace record, a `--turn` that names no turn or several) is
reported on stderr with the file and line, and the command exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import msgspec

from ._events import CallRecord, TurnTrace, event_decoder
from ._traces import read_traces

__all__ = ["add_traces_parser", "run_traces"]

_PROG = "moa-stream traces"
_MIN_COLUMN = 24
"""Narrowest column for side-by-side references; below it they are stacked."""
_GAP = " | "
_DEFAULT_LINES = 8


class _BadInput(Exception):
    """A message for stderr; the command exits 1."""


def add_traces_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `traces show FILE [--turn ID]` and `traces stats DIR` to the `moa-stream` subcommands."""
    traces = commands.add_parser(
        "traces",
        help="look at trace files: one turn, or totals",
        description="Look at the trace files written with trace_dir=: one turn side by side, or totals.",
    )
    sub = traces.add_subparsers(dest="traces_command", required=True, metavar="{show,stats}")
    show = sub.add_parser(
        "show",
        help="print one turn: the references side by side, then the aggregator's answer",
        description="Print one turn of a trace file (default: the last one): a header with the totals, the "
        "references side by side with status, tokens, cost and timing, then the aggregator's answer.",
    )
    show.add_argument("file", type=Path, metavar="FILE", help="a <session>.jsonl trace file")
    show.add_argument("--turn", metavar="ID", help="the turn to show: its id or a unique prefix of it")
    show.add_argument(
        "--lines",
        type=_positive,
        default=_DEFAULT_LINES,
        metavar="N",
        help=f"lines of each reference's answer to show (default {_DEFAULT_LINES})",
    )
    stats = sub.add_parser(
        "stats",
        help="total cost and tokens by model and by session",
        description="Total cost, tokens, calls and turns over every *.jsonl file of a trace directory, "
        "by model, by session and by what the caller asked for.",
    )
    stats.add_argument("directory", type=Path, metavar="DIR", help="a trace directory")


def run_traces(args: argparse.Namespace) -> int:
    """Run `traces show` or `traces stats` from parsed arguments; 1 for bad input, else 0."""
    out, err = sys.stdout, sys.stderr
    command = getattr(args, "traces_command", None)
    try:
        if command == "show":
            _show(args.file, getattr(args, "turn", None), getattr(args, "lines", _DEFAULT_LINES), out, err)
            return 0
        if command == "stats":
            return _stats(args.directory, out, err)
        raise _BadInput(f"unknown command {command!r} (expected show or stats)")
    except _BadInput as exc:
        print(f"{_PROG}: {exc}", file=err)
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


# -- reading ------------------------------------------------------------------------------------


def _load(path: Path, err: TextIO) -> list[TurnTrace]:
    """Every record of `path`; a torn last line is mentioned on `err`, anything worse raises."""
    try:
        records = list(read_traces(path))
        data = path.read_bytes()
    except ValueError as exc:  # read_traces names the file and line
        raise _BadInput(str(exc)) from None
    except OSError as exc:
        raise _BadInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    # read_traces skips a last line that does not decode (a crash mid-write); say so.
    tail = data.rsplit(b"\n", 1)[-1]
    if tail.strip():
        try:
            event_decoder.decode(tail)
        except msgspec.DecodeError:
            line = data.count(b"\n") + 1
            print(
                f"{_PROG}: {path}:{line}: incomplete last line skipped (a crash or a write in progress)",
                file=err,
            )
    return records


# -- show ---------------------------------------------------------------------------------------


def _show(path: Path, turn: str | None, lines: int, out: TextIO, err: TextIO) -> None:
    records = _load(path, err)
    if not records:
        raise _BadInput(f"{path}: no turns in this file")
    if turn is None:
        record = records[-1]
    else:
        ids = list(dict.fromkeys(r.turn_id for r in records if r.turn_id.startswith(turn)))
        if not ids:
            raise _BadInput(f"{path}: no turn id starts with {turn!r} ({len(records)} turns in the file)")
        if len(ids) > 1:
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise _BadInput(f"{path}: {turn!r} matches {len(ids)} turns ({shown}); give more of the id")
        record = next(r for r in records if r.turn_id == ids[0])
    width = max(40, shutil.get_terminal_size((100, 24)).columns)
    out.write("\n".join(_render_turn(record, width, lines)) + "\n")


def _render_turn(record: TurnTrace, width: int, lines: int) -> list[str]:
    end = record.end
    model = record.model
    if record.preset is not None:
        model += f"  (preset {record.preset}"
        if record.cadence is not None:
            model += ", references " + ("reused: cadence hit" if record.cadence == "hit" else "run: cadence miss")
        model += ")"
    failed = f", {end.failed_calls} failed" if end.failed_calls else ""
    timing = [f"started {_when(end.started_at)}", f"ttft {_secs(end.ttft_s)}", f"took {_secs(end.duration_s)}"]
    if record.aggregator_wait_s is not None:
        timing.append(f"aggregator waited {_secs(record.aggregator_wait_s)}")
    tokens = f"input {end.input_tokens:,}"
    if any(c.usage.cached_input_tokens is not None for c in record.calls):
        tokens += f" (cached {end.cached_input_tokens:,})"
    tokens += f"  output {end.output_tokens:,}"
    if any(c.usage.reasoning_tokens is not None for c in record.calls):
        tokens += f" (reasoning {end.reasoning_tokens:,})"
    if not end.usage_complete:
        missing = sum(c.usage.usage_source == "missing" for c in record.calls)
        tokens += f"  [lower bound: usage missing for {_plural(missing, 'call')}]"
    if any(c.usage.usage_source == "estimated" for c in record.calls):
        tokens += "  (~ marks estimates: the upstream reported no usage for that call)"
    cost = _usd(end.cost_usd)
    if not end.cost_complete:
        unknown = sum(c.usage.cost_usd is None for c in record.calls)
        cost += f"  [lower bound: no known price for {_plural(unknown, 'call')}]"
    text: list[str] = []
    for name, value in (
        ("turn", record.turn_id),
        ("session", record.session_id),
        ("model", model),
        ("status", f"{end.status}  ({_plural(end.calls, 'call')}{failed})  " + "  ".join(timing)),
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
    return [_cut(fact, width) for fact in facts] + ["-" * width] + _excerpt(_answer(call), width, lines)


def _stacked(calls: list[CallRecord], width: int, lines: int) -> list[str]:
    rows: list[str] = []
    for index, call in enumerate(calls):
        if index:
            rows.append("")
        rows.append(_cut(f"[{index + 1}] {_title(call)}", width))
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
    tokens = f"in {_tokens(usage.input_tokens, mark)}"
    if usage.cached_input_tokens:
        tokens += f" ({usage.cached_input_tokens:,} cached)"
    tokens += f" / out {_tokens(usage.output_tokens, mark)}"
    if usage.reasoning_tokens:
        tokens += f" ({usage.reasoning_tokens:,} reasoning)"
    cost = _usd(usage.cost_usd) if usage.cost_usd is not None else "cost unknown"
    return [status, tokens, cost, f"ttft {_secs(usage.ttft_s)}", f"took {_secs(usage.duration_s)}"]


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
    return _printable("\n".join(parts))


def _excerpt(text: str, width: int, lines: int) -> list[str]:
    wrapped = _wrap(text, width)
    if len(wrapped) <= lines:
        return wrapped
    more = len(wrapped) - lines + 1
    return [*wrapped[: lines - 1], _cut(f"... {_plural(more, 'more line')}", width)]


def _wrap(text: str, width: int) -> list[str]:
    rows: list[str] = []
    for paragraph in text.splitlines() or [""]:
        rows.extend(textwrap.wrap(paragraph, width, break_long_words=True, replace_whitespace=False) or [""])
    return rows


# Model output is untrusted: control characters (terminal escapes) are shown, not sent to the terminal.
_CONTROL = {code: "\N{REPLACEMENT CHARACTER}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code not in (9, 10)}


def _printable(text: str) -> str:
    return text.translate(_CONTROL).expandtabs(4)


def _pack(items: list[str], width: int) -> list[str]:
    """`items` two spaces apart, broken into lines between items, never inside one."""
    rows: list[str] = []
    for item in items:
        if rows and len(rows[-1]) + 2 + len(item) <= width:
            rows[-1] += "  " + item
        else:
            rows.append(_cut(item, width))
    return rows


def _field(name: str, value: str, width: int) -> list[str]:
    """`name` in a 9-wide gutter, then `value` wrapped under itself."""
    gutter = " " * 9
    return textwrap.wrap(
        _printable(value), width, initial_indent=name.ljust(9), subsequent_indent=gutter, break_on_hyphens=False
    ) or [name]


def _rule(title: str, width: int) -> str:
    return _cut(f"-- {title} ", width).ljust(width, "-")


def _cut(text: str, width: int) -> str:
    text = _printable(text).replace("\n", " ")
    return text if len(text) <= width else text[: max(0, width - 1)] + "\N{HORIZONTAL ELLIPSIS}"


# -- stats --------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Totals:
    turns: set[str] = dataclasses.field(default_factory=set)
    calls: int = 0
    input: int = 0
    cached: int = 0
    cached_known: int = 0
    output: int = 0
    reasoning: int = 0
    reasoning_known: int = 0
    usage_missing: int = 0
    estimated: int = 0
    cost: float = 0.0
    cost_unknown: int = 0

    def add(self, record: TurnTrace, call: CallRecord) -> None:
        usage = call.usage
        self.turns.add(record.turn_id)
        self.calls += 1
        if usage.usage_source == "missing":
            self.usage_missing += 1
        elif usage.usage_source == "estimated":
            self.estimated += 1
        self.input += usage.input_tokens or 0
        self.output += usage.output_tokens or 0
        if usage.cached_input_tokens is not None:
            self.cached += usage.cached_input_tokens
            self.cached_known += 1
        if usage.reasoning_tokens is not None:
            self.reasoning += usage.reasoning_tokens
            self.reasoning_known += 1
        if usage.cost_usd is None or not math.isfinite(usage.cost_usd):
            self.cost_unknown += 1
        else:
            self.cost += usage.cost_usd

    def cost_cell(self) -> str:
        if self.calls and self.cost_unknown == self.calls:
            return "unknown"
        return _usd(self.cost) + ("+" if self.cost_unknown else "")

    def row(self, name: str) -> list[str]:
        return [
            name,
            f"{len(self.turns):,}",
            f"{self.calls:,}",
            f"{self.input:,}" if self.usage_missing < self.calls else "-",
            f"{self.cached:,}" if self.cached_known else "-",
            f"{self.output:,}" if self.usage_missing < self.calls else "-",
            f"{self.reasoning:,}" if self.reasoning_known else "-",
            self.cost_cell(),
        ]


def _stats(directory: Path, out: TextIO, err: TextIO) -> int:
    if not directory.is_dir():
        what = "no such directory" if not directory.exists() else "not a directory"
        raise _BadInput(f"{directory}: {what}")
    try:
        files = sorted(path for path in directory.glob("*.jsonl") if path.is_file())
    except OSError as exc:
        raise _BadInput(f"{directory}: cannot list: {exc.strerror or exc}") from None
    if not files:
        raise _BadInput(f"{directory}: no *.jsonl trace files")

    total = _Totals()
    by_model: dict[str, _Totals] = {}
    by_session: dict[str, _Totals] = {}
    by_request: dict[str, _Totals] = {}
    bad = 0
    read = 0
    for path in files:
        try:
            records = _load(path, err)
        except _BadInput as exc:
            print(f"{_PROG}: {exc} (file skipped)", file=err)
            bad += 1
            continue
        read += 1
        for record in records:
            for call in record.calls:
                for totals in (
                    total,
                    by_model.setdefault(call.usage.model, _Totals()),
                    by_session.setdefault(record.session_id, _Totals()),
                    by_request.setdefault(record.model, _Totals()),
                ):
                    totals.add(record, call)
            if not record.calls:  # a turn with no upstream call still counts as a turn
                for totals in (total, by_session.setdefault(record.session_id, _Totals())):
                    totals.turns.add(record.turn_id)

    skipped = f" ({bad} unreadable, skipped)" if bad else ""
    out.write(
        f"{directory}: {_plural(read, 'file')}{skipped}, {_plural(len(total.turns), 'turn')}, "
        f"{_plural(total.calls, 'call')}\n"
    )
    cost = f"cost     {_usd(total.cost)}"
    if total.cost_unknown:
        cost += f"  (lower bound: no known price for {_plural(total.cost_unknown, 'call')})"
    out.write(cost + "\n")
    tokens = f"tokens   input {total.input:,}"
    if total.cached_known:
        tokens += f" (cached {total.cached:,})"
    tokens += f"  output {total.output:,}"
    if total.reasoning_known:
        tokens += f" (reasoning {total.reasoning:,})"
    notes = []
    if total.usage_missing:
        notes.append(f"usage missing for {_plural(total.usage_missing, 'call')}")
    if total.estimated:
        notes.append(f"{_plural(total.estimated, 'call')} estimated")
    if notes:
        tokens += f"  ({'; '.join(notes)})"
    out.write(tokens + "\n")
    for title, groups in (("model", by_model), ("session", by_session), ("requested model", by_request)):
        out.write("\n" + _table(title, groups) + "\n")
    if any(t.cost_unknown and t.cost_unknown < t.calls for t in (*by_model.values(), *by_session.values())):
        out.write("\n+ lower bound: some calls have no known price\n")
    return 1 if bad else 0


def _table(title: str, groups: dict[str, _Totals]) -> str:
    header = [f"by {title}", "turns", "calls", "input", "cached", "output", "reasoning", "cost"]
    ordered = sorted(groups.items(), key=lambda item: (-item[1].cost, -item[1].calls, item[0]))
    rows = [header] + [totals.row(_cut(name or "(none)", 40)) for name, totals in ordered]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row) if i]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# -- formatting ---------------------------------------------------------------------------------


def _usd(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "unknown"
    return f"${value:.6f}"


def _secs(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.3f}s"


def _tokens(value: int | None, mark: str) -> str:
    return "?" if value is None else f"{mark}{value:,}"


def _when(timestamp: float) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - `python -m moa_stream._traces_cli`
    parser = argparse.ArgumentParser(prog="moa-stream")
    add_traces_parser(parser.add_subparsers(dest="command", required=True))
    return run_traces(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
