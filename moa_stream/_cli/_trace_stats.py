"""`moa-stream traces stats`: totals over a trace directory, by model, session, requested model and role.

Every table adds up to the totals: calls, tokens, tool calls and cost in all of them; turns in the
session and requested-model tables, where each turn has one row. A turn that made no call (one a budget
refused) has no model and no role: the model and role tables give such turns a `(no call)` row, so that
they are counted there too.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
from typing import Any, TextIO

from .._events import CallRecord, TurnTrace
from ._text import cut, plural, usd
from ._trace_json import envelope, write_json
from ._trace_prices import WhatIf, load_prices
from ._trace_select import Gathered, call_tool_calls, filters_text, gather, no_turns, refused

NO_CALL = "(no call)"
"""The model and role tables' row for turns that made no call; `null` in JSON."""
_ROLES = ("direct", "reference", "aggregator", NO_CALL)


@dataclasses.dataclass(slots=True)
class _Totals:
    turns: set[str] = dataclasses.field(default_factory=set)
    refused: set[str] = dataclasses.field(default_factory=set)
    failed_turns: set[str] = dataclasses.field(default_factory=set)
    calls: int = 0
    failed: int = 0
    input: int = 0
    cached: int = 0
    cached_known: int = 0
    cache_write: int = 0
    cache_write_known: int = 0
    output: int = 0
    reasoning: int = 0
    reasoning_known: int = 0
    tools: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    tool_calls: int = 0
    usage_missing: int = 0
    estimated: int = 0
    cost: float = 0.0
    cost_unknown: int = 0

    def add_turn(self, record: TurnTrace) -> None:
        self.turns.add(record.turn_id)
        if refused(record):
            self.refused.add(record.turn_id)
        elif record.end.status == "error":
            self.failed_turns.add(record.turn_id)

    def add(self, record: TurnTrace, call: CallRecord) -> None:
        usage = call.usage
        self.add_turn(record)
        self.calls += 1
        self.failed += usage.status == "error"
        if usage.usage_source == "missing":
            self.usage_missing += 1
        elif usage.usage_source == "estimated":
            self.estimated += 1
        self.input += usage.input_tokens or 0
        self.output += usage.output_tokens or 0
        if usage.cached_input_tokens is not None:
            self.cached += usage.cached_input_tokens
            self.cached_known += 1
        if usage.cache_write_tokens is not None:
            self.cache_write += usage.cache_write_tokens
            self.cache_write_known += 1
        if usage.reasoning_tokens is not None:
            self.reasoning += usage.reasoning_tokens
            self.reasoning_known += 1
        self.tool_calls += call_tool_calls(call)
        self.tools.update(tool.name or "?" for tool in call.output.tool_calls)
        if usage.cost_usd is None or not math.isfinite(usage.cost_usd):
            self.cost_unknown += 1
        else:
            self.cost += usage.cost_usd

    def cost_cell(self) -> str:
        if self.calls and self.cost_unknown == self.calls:
            return "unknown"
        return usd(self.cost) + ("+" if self.cost_unknown else "")

    def row(self, name: str) -> list[str]:
        known = self.usage_missing < self.calls or not self.calls
        return [
            name,
            f"{len(self.turns):,}",
            f"{len(self.refused):,}",
            f"{self.calls:,}",
            f"{self.failed:,}",
            f"{self.input:,}" if known else "-",
            f"{self.cached:,}" if self.cached_known else "-",
            f"{self.cache_write:,}" if self.cache_write_known else "-",
            f"{self.output:,}" if known else "-",
            f"{self.reasoning:,}" if self.reasoning_known else "-",
            f"{self.tool_calls:,}",
            self.cost_cell(),
        ]

    def json(self) -> dict[str, Any]:
        return {
            "turns": len(self.turns),
            "refused_turns": len(self.refused),
            "failed_turns": len(self.failed_turns),
            "calls": self.calls,
            "failed_calls": self.failed,
            "input_tokens": self.input,
            "cached_input_tokens": self.cached,
            "cache_write_tokens": self.cache_write,
            "output_tokens": self.output,
            "reasoning_tokens": self.reasoning,
            "tool_calls": self.tool_calls,
            "tool_names": dict(self.tools.most_common()),
            "usage_missing_calls": self.usage_missing,
            "estimated_calls": self.estimated,
            "cost_usd": self.cost,
            "cost_unknown_calls": self.cost_unknown,
            "cost_complete": not self.cost_unknown,
        }


@dataclasses.dataclass(slots=True)
class _Stats:
    total: _Totals = dataclasses.field(default_factory=_Totals)
    by_model: dict[str, _Totals] = dataclasses.field(default_factory=dict)
    by_session: dict[str, _Totals] = dataclasses.field(default_factory=dict)
    by_request: dict[str, _Totals] = dataclasses.field(default_factory=dict)
    by_role: dict[str, _Totals] = dataclasses.field(default_factory=dict)

    def add(self, record: TurnTrace) -> None:
        # Every turn has one session and one requested model, calls or not.
        session, request = self._of(self.by_session, record.session_id), self._of(self.by_request, record.model)
        for totals in (self.total, session, request):
            totals.add_turn(record)
        for call in record.calls:
            for totals in (
                self.total,
                self._of(self.by_model, call.usage.model),
                self._of(self.by_session, record.session_id),
                self._of(self.by_request, record.model),
                self._of(self.by_role, call.role),
            ):
                totals.add(record, call)
        if not record.calls:
            self._of(self.by_model, NO_CALL).add_turn(record)
            self._of(self.by_role, NO_CALL).add_turn(record)

    @staticmethod
    def _of(groups: dict[str, _Totals], name: str) -> _Totals:
        return groups.setdefault(name, _Totals())

    def tables(self) -> list[tuple[str, str, list[tuple[str, _Totals]]]]:
        """Each table's title, its JSON key and its rows."""
        return [
            ("model", "by_model", _ordered(self.by_model)),
            ("session", "by_session", _ordered(self.by_session)),
            ("requested model", "by_requested_model", _ordered(self.by_request)),
            ("role", "by_role", [(role, self.by_role[role]) for role in _ROLES if role in self.by_role]),
        ]


def _ordered(groups: dict[str, _Totals]) -> list[tuple[str, _Totals]]:
    return sorted(groups.items(), key=lambda item: (item[0] == NO_CALL, -item[1].cost, -item[1].calls, item[0]))


def stats_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    since, sessions = args.since, args.session
    prices = load_prices(args.prices) if args.prices is not None else None
    gathered = gather(args.directory, err, since=since, sessions=sessions, directory_only=True)
    stats = _Stats()
    what_if = WhatIf(prices) if prices is not None else None
    for turn in gathered.turns:
        stats.add(turn.record)
        if what_if is not None:
            what_if.add(turn.record)
    if args.json:
        document = envelope("stats", gathered, since, sessions)
        document["total"] = stats.total.json()
        for _, key, rows in stats.tables():
            document[key] = [{"name": None if name == NO_CALL else name, **t.json()} for name, t in rows]
        document["prices"] = None if what_if is None else what_if.json(args.prices)
        write_json(document, out)
    else:
        out.write(_text(gathered, stats, since, sessions))
        if what_if is not None:
            out.write("\n" + what_if.text(args.prices))
    return 1 if gathered.skipped else 0


def _text(gathered: Gathered, stats: _Stats, since: float | None, sessions: list[str] | None) -> str:
    total = stats.total
    skipped = f" ({len(gathered.skipped)} unreadable, skipped)" if gathered.skipped else ""
    turn_notes = [f"{len(total.refused):,} refused"] if total.refused else []
    if total.failed_turns:
        turn_notes.append(f"{len(total.failed_turns):,} failed")
    turns = plural(len(total.turns), "turn") + (f" ({', '.join(turn_notes)})" if turn_notes else "")
    calls = plural(total.calls, "call") + (f" ({total.failed:,} failed)" if total.failed else "")
    lines = [f"{gathered.source}: {plural(gathered.files, 'file')}{skipped}, {turns}, {calls}"]
    if since is not None or sessions:
        lines.append(f"filters  {filters_text(since, sessions)} ({gathered.read:,} turns read)")
        if not gathered.turns:
            lines.append(no_turns(gathered, since, sessions))
    cost = f"cost     {usd(total.cost)}"
    if total.cost_unknown:
        cost += f"  (lower bound: no known price for {plural(total.cost_unknown, 'call')})"
    lines.append(cost)
    tokens = f"tokens   input {total.input:,}"
    if total.cached_known:
        tokens += f" (cached {total.cached:,})"
    tokens += f"  output {total.output:,}"
    if total.reasoning_known:
        tokens += f" (reasoning {total.reasoning:,})"
    if total.cache_write_known:
        tokens += f"  cache write {total.cache_write:,}"
    notes = []
    if total.usage_missing:
        notes.append(f"usage missing for {plural(total.usage_missing, 'call')}")
    if total.estimated:
        notes.append(f"{plural(total.estimated, 'call')} estimated")
    if notes:
        tokens += f"  ({'; '.join(notes)})"
    lines.append(tokens)
    if total.tool_calls:
        names = ", ".join(f"{name} {count:,}" for name, count in total.tools.most_common(8))
        lines.append(f"tools    {plural(total.tool_calls, 'tool call')}" + (f" ({names})" if names else ""))
    for title, _, rows in stats.tables():
        lines += ["", table(title, rows)]
    groups = [t for _, _, rows in stats.tables() for _, t in rows]
    if any(t.cost_unknown and t.cost_unknown < t.calls for t in groups):
        lines += ["", "+ lower bound: some calls have no known price"]
    if NO_CALL in stats.by_model:
        lines += ["", f"{NO_CALL}: turns refused (or ended) before any call was sent: no model, no role"]
    return "\n".join(lines) + "\n"


_HEADER = ["turns", "refused", "calls", "failed", "input", "cached", "cache-write", "output", "reasoning"]


def table(title: str, rows: list[tuple[str, _Totals]]) -> str:
    header = [f"by {title}", *_HEADER, "tool-calls", "cost"]
    cells = [header] + [totals.row(cut(name or "(none)", 40)) for name, totals in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        line = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row) if i]
        lines.append("  ".join(line).rstrip())
    return "\n".join(lines)
