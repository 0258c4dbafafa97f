"""Usage summed over calls: the unit of ledgers, budgets and turn records."""

from __future__ import annotations

import msgspec

from ._events import CallUsage


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Usage summed over calls. `cost_usd` is a lower bound when `unpriced_calls` > 0."""

    calls: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0
    """Calls whose price was unknown (their cost is not in `cost_usd`)."""
    tool_calls: int = 0
    """Tool calls the models requested in their answers."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cost_complete(self) -> bool:
        return self.unpriced_calls == 0

    def plus(self, usage: CallUsage) -> Totals:
        return Totals(
            calls=self.calls + 1,
            failed_calls=self.failed_calls + (usage.status == "error"),
            input_tokens=self.input_tokens + (usage.input_tokens or 0),
            cached_input_tokens=self.cached_input_tokens + (usage.cached_input_tokens or 0),
            cache_write_tokens=self.cache_write_tokens + (usage.cache_write_tokens or 0),
            output_tokens=self.output_tokens + (usage.output_tokens or 0),
            reasoning_tokens=self.reasoning_tokens + (usage.reasoning_tokens or 0),
            cost_usd=self.cost_usd + (usage.cost_usd or 0.0),
            unpriced_calls=self.unpriced_calls + (usage.cost_usd is None and usage.usage_source != "missing"),
            tool_calls=self.tool_calls + usage.tool_calls,
        )
