"""`moa-stream traces stats`: totals over a trace directory, by model, session and request."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TextIO

from .._events import CallRecord, TurnTrace
from ._text import PROG, BadInput, cut, load, plural, usd


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
        return usd(self.cost) + ("+" if self.cost_unknown else "")

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


def stats_command(directory: Path, out: TextIO, err: TextIO) -> int:
    if not directory.is_dir():
        what = "no such directory" if not directory.exists() else "not a directory"
        raise BadInput(f"{directory}: {what}")
    try:
        files = sorted(path for path in directory.glob("*.jsonl") if path.is_file())
    except OSError as exc:
        raise BadInput(f"{directory}: cannot list: {exc.strerror or exc}") from None
    if not files:
        raise BadInput(f"{directory}: no *.jsonl trace files")

    total = _Totals()
    by_model: dict[str, _Totals] = {}
    by_session: dict[str, _Totals] = {}
    by_request: dict[str, _Totals] = {}
    bad = 0
    read = 0
    for path in files:
        try:
            records = load(path, err)
        except BadInput as exc:
            print(f"{PROG}: {exc} (file skipped)", file=err)
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
        f"{directory}: {plural(read, 'file')}{skipped}, {plural(len(total.turns), 'turn')}, "
        f"{plural(total.calls, 'call')}\n"
    )
    cost = f"cost     {usd(total.cost)}"
    if total.cost_unknown:
        cost += f"  (lower bound: no known price for {plural(total.cost_unknown, 'call')})"
    out.write(cost + "\n")
    tokens = f"tokens   input {total.input:,}"
    if total.cached_known:
        tokens += f" (cached {total.cached:,})"
    tokens += f"  output {total.output:,}"
    if total.reasoning_known:
        tokens += f" (reasoning {total.reasoning:,})"
    notes = []
    if total.usage_missing:
        notes.append(f"usage missing for {plural(total.usage_missing, 'call')}")
    if total.estimated:
        notes.append(f"{plural(total.estimated, 'call')} estimated")
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
    rows = [header] + [totals.row(cut(name or "(none)", 40)) for name, totals in ordered]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row) if i]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
