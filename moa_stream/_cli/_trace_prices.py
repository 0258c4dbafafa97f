"""`moa-stream traces stats --prices FILE`: what the recorded calls would have cost under another price table.

The recorded token counts are priced again with `PriceTable.cost`, the way the meter priced them (the
model the response named, else the one asked for), so that a what-if for other providers' prices or
another preset's models reads side by side with what was paid. A model the file does not price is
`unpriced`, never $0: its calls are left out of the what-if sums, which are then lower bounds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .._events import CallRecord, TurnTrace
from .._pricing import PriceTable
from ._text import BadInput, cut, plural, usd


def load_prices(path: Path) -> PriceTable:
    try:
        return PriceTable.from_litellm_file(path)
    except ValueError as exc:  # names the file: unreadable, not JSON, a bad entry
        raise BadInput(str(exc)) from None


@dataclasses.dataclass(slots=True)
class _Cost:
    calls: int = 0
    recorded: float = 0.0
    recorded_unknown: int = 0
    what_if: float = 0.0
    unpriced: int = 0
    """Calls of a model the file has no price for."""
    no_usage: int = 0
    """Calls of a priced model whose token counts are unknown (the call failed before any usage)."""

    def add(self, call: CallRecord, prices: PriceTable) -> None:
        self.calls += 1
        recorded = call.usage.cost_usd
        if recorded is None or not math.isfinite(recorded):
            self.recorded_unknown += 1
        else:
            self.recorded += recorded
        cost = _reprice(call, prices)
        if cost is None:
            self.unpriced += 1
        elif math.isnan(cost):
            self.no_usage += 1
        else:
            self.what_if += cost

    @property
    def priced(self) -> int:
        return self.calls - self.unpriced - self.no_usage

    def change(self) -> float | None:
        """What-if over recorded, as a percentage; None unless both sums are complete."""
        if self.recorded_unknown or self.unpriced or self.no_usage:
            return None
        if self.recorded == 0:
            return 0.0 if self.what_if == 0 else None
        return (self.what_if - self.recorded) / self.recorded * 100

    def cells(self, name: str) -> list[str]:
        if self.calls and self.recorded_unknown == self.calls:
            recorded = "unknown"
        else:
            recorded = usd(self.recorded) + ("+" if self.recorded_unknown else "")
        if self.priced:
            what_if = usd(self.what_if) + ("+" if self.priced < self.calls else "")
        else:
            what_if = "unpriced" if self.unpriced else "unknown"
        change = self.change()
        return [name, f"{self.calls:,}", recorded, what_if, "-" if change is None else f"{change:+.1f}%"]

    def json(self) -> dict[str, Any]:
        change = self.change()
        return {
            "calls": self.calls,
            "recorded_cost_usd": self.recorded,
            "recorded_cost_unknown_calls": self.recorded_unknown,
            "whatif_cost_usd": self.what_if if self.priced else None,
            "unpriced_calls": self.unpriced,
            "usage_missing_calls": self.no_usage,
            "whatif_complete": self.priced == self.calls,
            "change_pct": None if change is None else round(change, 6),
        }


def _reprice(call: CallRecord, prices: PriceTable) -> float | None:
    """The call's cost under `prices`: None when they do not price its model, NaN when its usage is unknown."""
    usage = call.usage
    model = usage.model if prices.lookup(usage.model) is not None else call.model
    if prices.lookup(model) is None:
        return None
    cost = prices.cost(
        model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )
    return math.nan if cost is None else cost


class WhatIf:
    """Recorded cost beside the cost under `prices`, per model, per requested model and in total."""

    def __init__(self, prices: PriceTable) -> None:
        self._prices = prices
        self.total = _Cost()
        self.by_model: dict[str, _Cost] = {}
        self.by_request: dict[str, _Cost] = {}

    def add(self, record: TurnTrace) -> None:
        for call in record.calls:
            for cost in (
                self.total,
                self.by_model.setdefault(call.usage.model, _Cost()),
                self.by_request.setdefault(record.model, _Cost()),
            ):
                cost.add(call, self._prices)

    def json(self, path: Path) -> dict[str, Any]:
        return {
            "file": str(path),
            "models_priced": len(self._prices),
            "total": self.total.json(),
            "by_model": [{"name": name, **cost.json()} for name, cost in _ordered(self.by_model)],
            "by_requested_model": [{"name": name, **cost.json()} for name, cost in _ordered(self.by_request)],
        }

    def text(self, path: Path) -> str:
        lines = [f"what-if prices: {path} ({plural(len(self._prices), 'model')} priced)"]
        for title, groups in (("model", self.by_model), ("requested model", self.by_request)):
            rows = [cost.cells(cut(name or "(none)", 40)) for name, cost in _ordered(groups)]
            header = [f"by {title}", "calls", "recorded", "what-if", "change"]
            lines += ["", *_grid([header, *rows, self.total.cells("total")])]
        unpriced = sorted(name for name, cost in self.by_model.items() if cost.unpriced)
        if unpriced:
            lines += [
                "",
                f"unpriced: {path} has no price for {', '.join(unpriced)} "
                f"({plural(self.total.unpriced, 'call')}, left out of the what-if: + marks a lower bound)",
            ]
        if self.total.no_usage:
            lines.append(f"no usage recorded for {plural(self.total.no_usage, 'call')}: not re-priced")
        return "\n".join(lines) + "\n"


def _ordered(groups: dict[str, _Cost]) -> list[tuple[str, _Cost]]:
    return sorted(groups.items(), key=lambda item: (-item[1].recorded, -item[1].calls, item[0]))


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
        for row in rows
    ]
