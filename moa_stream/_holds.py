"""Holds: what a call may use at worst, reserved before it starts and settled when it ends.

A call is admitted when, for every limit that applies (its session's, its API key's, its turn's),
what was settled plus what open holds reserve has not reached the limit (for `calls`: one more
call still fits). Admitting it adds its hold; settling replaces the hold by the real usage. So
however many calls run at once, a token or cost limit is passed by at most one call's hold. The
rule is written once here; the Redis store's scripts apply the same rule (see `_redis_lua`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec

from ._budget import BudgetBreach, LimitName, Limits, Scope
from ._pricing import PriceTable
from ._totals import Totals
from ._usage import estimate_input_tokens

DEFAULT_HOLD_OUTPUT_TOKENS = 4096
"""The output tokens a call is held for when its request sets no `max_tokens` (or the like)."""


class Amounts(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Calls, tokens and cost, as a hold reserves them or as open holds add up."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def plus(self, other: Amounts) -> Amounts:
        return Amounts(
            calls=self.calls + other.calls,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
        )

    def minus(self, other: Amounts) -> Amounts:
        return Amounts(
            calls=self.calls - other.calls,
            input_tokens=self.input_tokens - other.input_tokens,
            output_tokens=self.output_tokens - other.output_tokens,
            cost_usd=max(0.0, self.cost_usd - other.cost_usd),
        )


NO_AMOUNTS = Amounts()


class Hold(msgspec.Struct, frozen=True, kw_only=True):
    """One call's worst case, reserved under its call id; `required` ones are all or nothing."""

    call_id: str
    amounts: Amounts
    required: bool = True
    label: str = ""


class ScopeLimits(NamedTuple):
    """The limits of one scope (a session, an API key) a call is checked against."""

    scope: Scope
    scope_id: str
    """The session id, or the key id."""
    limits: Limits


def worst_case(
    call_id: str,
    *,
    model: str,
    input_messages: list[Any],
    max_output_tokens: int | None,
    prices: PriceTable,
    cap: int = DEFAULT_HOLD_OUTPUT_TOKENS,
    required: bool = True,
    label: str = "",
    extra_input_tokens: int = 0,
) -> Hold:
    """The hold of a call: its input estimate plus its output bound, priced from the price table
    (no price: cost 0, as the call's own cost will be)."""
    input_tokens = estimate_input_tokens(input_messages) + extra_input_tokens
    output_tokens = max_output_tokens if max_output_tokens is not None and max_output_tokens > 0 else cap
    cost = prices.cost(model, input_tokens=input_tokens, output_tokens=output_tokens)
    amounts = Amounts(calls=1, input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost or 0.0)
    return Hold(call_id=call_id, amounts=amounts, required=required, label=label)


def max_output_of(payload: dict[str, Any]) -> int | None:
    """The output bound a chat or Responses request sets, if any."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def refusal(
    scope: ScopeLimits, settled: Totals, held: Amounts, adding: Amounts = NO_AMOUNTS, *, session_id: str
) -> BudgetBreach | None:
    """The limit of `scope` that refuses one more call of `session_id`, given the scope's settled
    totals, its open holds and the holds admitted before this one in the same reservation (`adding`)."""
    for name, threshold in scope.limits.items():
        used = _used(name, settled, held, adding)
        if used + 1 > threshold if name == "calls" else used >= threshold:
            return BudgetBreach(
                scope=scope.scope,
                limit=name,
                threshold=threshold,
                spent=used,
                session_id=session_id,
                held=_used(name, Totals(), held, adding),
                key_id=scope.scope_id if scope.scope == "key" else None,
            )
    return None


def _used(name: LimitName, settled: Totals, held: Amounts, adding: Amounts) -> float:
    if name == "calls":
        return settled.calls + held.calls + adding.calls
    if name == "cost_usd":
        return settled.cost_usd + held.cost_usd + adding.cost_usd
    if name == "input_tokens":
        return settled.input_tokens + held.input_tokens + adding.input_tokens
    if name == "output_tokens":
        return settled.output_tokens + held.output_tokens + adding.output_tokens
    return settled.total_tokens + held.input_tokens + held.output_tokens + adding.input_tokens + adding.output_tokens


def admit_group(holds: Sequence[Hold], check: Any) -> tuple[list[Hold], BudgetBreach | None]:
    """Which of `holds` to admit, in order: each is checked with `check(adding)` (the limit that
    refuses one more call given the group's holds admitted so far). A refused required hold
    refuses the whole group ([] and its breach); refused optional ones are left out (the first
    such breach is returned with the admitted ones)."""
    admitted: list[Hold] = []
    adding = NO_AMOUNTS
    first: BudgetBreach | None = None
    for hold in holds:
        breach = check(adding)
        if breach is not None:
            if hold.required:
                return [], breach
            first = first or breach
            continue
        admitted.append(hold)
        adding = adding.plus(hold.amounts)
    return admitted, first
