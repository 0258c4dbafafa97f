"""Span events for a MoA turn's decisions, on its `invoke_agent` span: the quorum met, a straggler
the quorum-and-grace rule cancelled, a reference that timed out or answered without text, a call
the budget refused, a layer it held short.

Most come from `TurnTrace.moa_events`, recorded where the decision was taken (the record alone
cannot tell a straggler the rule cancelled from one the caller's cancellation stopped); a timeout
comes from its call's error, and a budget-short layer's details from `TurnTrace.budget_short`.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from opentelemetry.util.types import AttributeValue

from ._events import BudgetShort, CallRecord, MoaDecision, TurnTrace
from ._otel_attrs import as_list, count, epoch_ns, interval, put, text

_NAMES: Final = {
    "quorum_met": "moa.quorum_met",
    "reference_cancelled": "moa.reference.cancelled",
    "reference_unusable": "moa.reference.unusable",
    "budget_refused": "moa.budget.refused",
    "budget_short": "moa.budget.short",
}
TIMED_OUT: Final = "moa.reference.timed_out"


class SpanEvent(NamedTuple):
    name: str
    attributes: dict[str, AttributeValue]
    at_ns: int | None
    """When it happened (ns since the epoch); None when the record does not say."""


def moa_span_events(record: TurnTrace, calls: list[CallRecord]) -> list[SpanEvent]:
    """The turn's decisions as span events, in the order they happened."""
    shorts = {short.layer: short for short in as_list(record.budget_short) if isinstance(short, BudgetShort)}
    events: list[SpanEvent] = []
    for decision in as_list(record.moa_events):
        if not isinstance(decision, MoaDecision) or decision.kind not in _NAMES:
            continue
        attributes: dict[str, AttributeValue] = {}
        put(attributes, "moa.layer", count(decision.layer))
        put(attributes, "moa.label", text(decision.label))
        put(attributes, "moa.references.succeeded", count(decision.succeeded))
        put(attributes, "moa.references.total", count(decision.total))
        put(attributes, "moa.quorum", count(decision.quorum))
        put(attributes, "moa.budget.limit", text(decision.limit))
        if decision.kind == "budget_short":
            _short(attributes, shorts.pop(decision.layer, None) if decision.layer is not None else None)
        events.append(SpanEvent(_NAMES[decision.kind], attributes, epoch_ns(decision.at)))
    for short in shorts.values():  # a record with no decision for it: when is not known
        attributes = {"moa.layer": short.layer}
        _short(attributes, short)
        events.append(SpanEvent(_NAMES["budget_short"], attributes, None))
    for call in calls:
        usage = call.usage
        if call.role == "reference" and usage.status == "error" and text(usage.error).startswith("timed out"):
            attributes = {}
            put(attributes, "moa.label", text(call.label))
            put(attributes, "moa.call_id", text(call.call_id))
            put(attributes, "error.type", "timeout")
            events.append(SpanEvent(TIMED_OUT, attributes, interval(usage.started_at, usage.duration_s)[1]))
    # Stable, so that decisions taken at the same instant keep the order they were taken in.
    return sorted(events, key=lambda event: event.at_ns if event.at_ns is not None else 0)


def _short(attributes: dict[str, AttributeValue], short: BudgetShort | None) -> None:
    if short is None:
        return
    put(attributes, "moa.budget.policy", text(short.policy))
    put(attributes, "moa.budget.limit", text(short.limit))
    left_out = tuple(label for label in as_list(short.left_out) if isinstance(label, str))
    if left_out:
        attributes["moa.budget.left_out"] = left_out
