"""Budgets: hard limits checked before each upstream call starts, soft limits that warn once.

Limits apply per session (totals from the ledger, so across restarts with a trace directory) and
per turn (a MoA turn in a tool loop can make dozens of calls). A hard limit refuses a call when the
amount already spent has reached it, or, for `calls`, when one more call would pass it; calls in
flight count against `calls`, tokens and cost count once a call has ended.

This module is policy only, over totals it is given: the session store holds the totals and the
calls in flight, and applies the policy under its own lock when it admits a call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal

import msgspec
import openai

from ._checks import Where, check_table_keys
from ._errors import ConfigError, Refusal, error_response
from ._events import BudgetWarning, CallUsage
from ._totals import Totals

Scope = Literal["session", "turn", "key"]
LimitName = Literal["cost_usd", "input_tokens", "output_tokens", "total_tokens", "calls"]

BUDGET_ERROR = "budget_exceeded"
"""The `type` and `code` of the OpenAI-shaped error body of a refused call."""
BUDGET_HEADER = "x-moa-error"
"""Response header that marks a refusal, so that the wrapped client raises `BudgetExceeded`."""


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Upper bounds on what a session or a turn may use; None means no bound."""

    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    """Input plus output tokens."""
    calls: int | None = None
    """Upstream calls started (references and aggregators count one each)."""

    def items(self) -> list[tuple[LimitName, float]]:
        return [(name, value) for name in _LIMIT_NAMES if (value := getattr(self, name)) is not None]


_LIMIT_NAMES: tuple[LimitName, ...] = ("cost_usd", "input_tokens", "output_tokens", "total_tokens", "calls")


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """Hard limits (`session`, `turn`) refuse calls; soft ones (`session_soft`, `turn_soft`) emit a
    `BudgetWarning` once when crossed."""

    session: Limits = Limits()
    turn: Limits = Limits()
    session_soft: Limits = Limits()
    turn_soft: Limits = Limits()


class BudgetBreach(Refusal):
    """A hard limit that refuses the next call (internal; the caller gets `BudgetExceeded`)."""

    def __init__(
        self,
        *,
        scope: Scope,
        limit: LimitName,
        threshold: float,
        spent: float,
        session_id: str,
        held: float = 0.0,
        key_id: str | None = None,
    ) -> None:
        self.scope: Scope = scope
        self.limit: LimitName = limit
        self.threshold = threshold
        self.spent = spent
        """Settled plus held by calls in flight."""
        self.held = held
        self.session_id = session_id
        self.key_id = key_id
        super().__init__(self.message())

    def message(self) -> str:
        if self.limit == "calls":
            spent = f"{self.spent:g} calls were started"
            what = f"{self.threshold:g} calls"
        elif self.limit == "cost_usd":
            spent, what = f"${self.spent:.6g} was spent", f"${self.threshold:.6g}"
        else:
            noun = self.limit.replace("_", " ")
            spent, what = f"{self.spent:g} {noun} were used", f"{self.threshold:g} {noun}"
        if self.held and self.limit != "calls":
            spent += f" or held by calls in flight ({self.held:.6g} held)"
        where = f"API key {self.key_id!r}" if self.scope == "key" else f"session {self.session_id!r}"
        return (
            f"moa_stream budget exceeded: the {self.scope} limit {self.scope}.{self.limit} is {what} and "
            f"{spent} in {where}; the call was not sent"
        )

    def response(self, http: ModuleType) -> Any:
        """The refusal as a 400 that the wrapped client raises as `BudgetExceeded`."""
        return error_response(http, 400, self.message(), document=self.body(), headers={BUDGET_HEADER: BUDGET_ERROR})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message(),
                "type": BUDGET_ERROR,
                "param": f"{self.scope}.{self.limit}",
                "code": BUDGET_ERROR,
                "scope": self.scope,
                "limit": self.limit,
                "threshold": self.threshold,
                "spent": self.spent,
                "session_id": self.session_id,
                **({"key_id": self.key_id} if self.key_id is not None else {}),
            }
        }


class BudgetExceeded(openai.BadRequestError):
    """Raised by a wrapped client when a hard budget limit refused a call before it was sent.

    A `BadRequestError` (status 400, never retried), like a proxy's budget error; `scope`, `limit`,
    `threshold`, `spent` and `session_id` say which limit and how much was spent.
    """

    def __init__(self, message: str, *, response: Any, body: object | None) -> None:
        # As the SDK does: the exception's body is the error object inside the response body.
        details = body.get("error", body) if isinstance(body, dict) else {}
        super().__init__(message, response=response, body=details)
        self.scope: str | None = details.get("scope")
        self.limit: str | None = details.get("limit")
        self.threshold: float | None = details.get("threshold")
        self.spent: float | None = details.get("spent")
        self.session_id: str | None = details.get("session_id")


def validate_budget(budget: Budget, *, source: str = "budget=") -> Budget:
    """Check every limit's type and value; `ConfigError` names the source, field and value."""
    if not isinstance(budget, Budget):
        raise ConfigError(f"{source}: expected a moa_stream.Budget, got {type(budget).__name__}")
    for group in ("session", "turn", "session_soft", "turn_soft"):
        limits = getattr(budget, group)
        if not isinstance(limits, Limits):
            raise ConfigError(f"{source}: field {group!r}: expected a moa_stream.Limits, got {type(limits).__name__}")
        for name in _LIMIT_NAMES:
            _check_limit(source, f"{group}.{name}", getattr(limits, name), integer=name != "cost_usd")
    for scope in ("session", "turn"):
        hard, soft = getattr(budget, scope), getattr(budget, f"{scope}_soft")
        for name, value in soft.items():
            bound = getattr(hard, name)
            if bound is not None and value > bound:
                raise ConfigError(
                    f"{source}: field '{scope}_soft.{name}': {value!r} is above the hard limit "
                    f"{scope}.{name} = {bound!r}, so it could never warn"
                )
    return budget


def _check_limit(source: str, field: str, value: object, *, integer: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{source}: field {field!r}: expected {kind}, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{source}: field {field!r}: must be a finite number above 0, got {value!r}")


def budget_from_toml(source: str, table: object) -> Budget:
    """The `[budget]` table of a moa.toml: `[budget.session]`, `[budget.turn]`, and the `_soft` ones."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: 'budget' must be a table with [budget.session] and the like, got {table!r}")
    groups = {"session": Limits, "turn": Limits, "session_soft": Limits, "turn_soft": Limits}
    check_table_keys(Where(source), "budget", dict(table), groups, required=())
    fields: dict[str, Limits] = {}
    for group, limits in table.items():
        if not isinstance(limits, Mapping):
            raise ConfigError(f"{source}: field 'budget.{group}': expected a table of limits, got {limits!r}")
        check_table_keys(Where(source), f"budget.{group}", dict(limits), dict.fromkeys(_LIMIT_NAMES), required=())
        fields[group] = Limits(**limits)
    return validate_budget(Budget(**fields), source=f"{source}: [budget]")


class BudgetPolicy:
    """A `Budget` applied to totals: which call to refuse, which crossing to warn about."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.limits_cost = any(
            limits.cost_usd is not None
            for limits in (budget.session, budget.turn, budget.session_soft, budget.turn_soft)
        )
        self.limits_sessions = bool(budget.session.items())
        """Session limits need a session's totals: an unreadable sidecar must refuse, not restart from zero."""
        self.hard = bool(budget.session.items() or budget.turn.items())
        self.weighs = any(name != "calls" for limits in (budget.session, budget.turn) for name, _ in limits.items())
        """Some hard limit is on tokens or cost: holds must weigh a call's worst case."""

    def warnings(
        self,
        usage: CallUsage,
        session: tuple[Totals, Totals],
        turn: tuple[Totals, Totals],
        *,
        first_unpriced: bool,
    ) -> list[BudgetWarning]:
        """The soft limits this call crossed, and, for the session's first call without a price
        under a cost limit (`first_unpriced`), a warning that cost limits are not exact."""
        found: list[BudgetWarning] = []
        for scope, limits, (before, after) in (
            ("session", self.budget.session_soft, session),
            ("turn", self.budget.turn_soft, turn),
        ):
            for name, threshold in limits.items():
                # `before` and `after` are consecutive totals of one session or turn, and totals
                # only grow: a threshold lies between them for exactly one call.
                old, new = amount(name, before, before.calls), amount(name, after, after.calls)
                if old < threshold <= new:
                    found.append(_warning(usage, "soft_limit", scope, name, threshold, new))  # type: ignore[arg-type]
        if first_unpriced:
            found.append(
                _warning(usage, "cost_unknown", "session", "cost_usd", 0.0, session[1].cost_usd, model=usage.model)
            )
        return found

    def watches_unpriced(self, usage: CallUsage) -> bool:
        """Whether `usage` is a call without a price that a cost limit should warn about (once)."""
        return self.limits_cost and usage.cost_usd is None and usage.usage_source != "missing"


def amount(name: LimitName, totals: Totals, calls: int) -> float:
    """How much of a limit's unit `totals` used; `calls` is the count that the limit compares."""
    if name == "cost_usd":
        return totals.cost_usd
    if name == "input_tokens":
        return totals.input_tokens
    if name == "output_tokens":
        return totals.output_tokens
    if name == "total_tokens":
        return totals.total_tokens
    return calls


def _warning(
    usage: CallUsage,
    kind: Literal["soft_limit", "cost_unknown"],
    scope: Scope,
    limit: LimitName,
    threshold: float,
    spent: float,
    *,
    model: str = "",
) -> BudgetWarning:
    if kind == "cost_unknown":
        message = (
            f"the price of model {model!r} is unknown, so cost limits of session {usage.session_id!r} "
            f"cannot be enforced exactly: its calls count as $0 (add it with prices=)"
        )
    else:
        message = (
            f"session {usage.session_id!r} reached the soft limit {scope}_soft.{limit} = {threshold:g} ({spent:g})"
        )
    return BudgetWarning(
        session_id=usage.session_id,
        turn_id=usage.turn_id,
        kind=kind,
        scope=scope,
        limit=limit,
        threshold=threshold,
        spent=spent,
        message=message,
    )
