"""A MoA turn's decisions as span events on its `invoke_agent` span: quorum met, stragglers the rule
cancelled, references timed out or without text, budget refusals and layers held short."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import openai
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

import moa_stream
from moa_stream import Budget, Limits, Preset, Slot
from moa_stream._events import MoaDecision
from moa_stream.testing import Fault, SimModel, Simulator

from .conftest import EventLog
from .test_otel import Telemetry, call_usage, moa_turn, turn_of
from .test_sim import WEATHER_TOOL

Wrapped = Callable[..., openai.AsyncOpenAI]
GRACE = 0.05


@pytest.fixture
def sim() -> Simulator:
    return Simulator(
        [
            SimModel(name="m1"),
            SimModel(name="m2"),
            SimModel(name="m-slow", fault=Fault(kind="stall", after_chunks=3)),
            SimModel(name="m-fail", fault=Fault(kind="http_500")),
        ]
    )


@pytest.fixture
def otel() -> Telemetry:
    return Telemetry()


def turn_span(otel: Telemetry) -> ReadableSpan:
    [turn] = [span for span in otel.spans() if span.kind == SpanKind.INTERNAL]
    return turn


def events(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(event.name, dict(event.attributes or {})) for event in span.events]


def named(span: ReadableSpan, name: str) -> SpanEvent:
    [event] = [event for event in span.events if event.name == name]
    return event


async def test_quorum_met_and_the_straggler_the_rule_cancelled(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    presets = {"q": Preset(references=["m1", "m2", "m-slow"], aggregator="m2", quorum=2, grace=GRACE)}
    client = wrapped(presets=presets, sinks=[log, otel.sink])
    await moa_turn(client, "q")
    turn = turn_span(otel)
    assert events(turn) == [
        ("moa.quorum_met", {"moa.layer": 1, "moa.references.succeeded": 2, "moa.references.total": 3, "moa.quorum": 2}),
        ("moa.reference.cancelled", {"moa.layer": 1, "moa.label": "m-slow"}),
    ]
    met, cancelled = turn.events
    assert turn.start_time is not None
    assert turn.end_time is not None
    assert turn.start_time <= met.timestamp <= cancelled.timestamp <= turn.end_time
    assert cancelled.timestamp - met.timestamp >= GRACE * 1e9 * 0.9  # the grace was waited for
    [record] = log.of(moa_stream.TurnTrace)
    assert [d.kind for d in record.moa_events] == ["quorum_met", "reference_cancelled"]


async def test_a_turn_the_caller_cancels_records_no_decision_of_the_rule(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(presets={"all": Preset(references=["m1", "m-slow"], aggregator="m2")}, sinks=[log, otel.sink])
    with anyio.move_on_after(0.5) as scope:
        await moa_turn(client, "all")
    assert scope.cancelled_caught
    await moa_stream.flush(client)
    [record] = log.of(moa_stream.TurnTrace)
    assert {call.label: call.usage.status for call in record.calls} == {"m1": "completed", "m-slow": "cancelled"}
    assert record.moa_events == []
    assert events(turn_span(otel)) == []


async def test_a_reference_that_timed_out(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    presets = {"t": Preset(references=["m1", "m-slow"], aggregator="m2", reference_timeout=0.2)}
    client = wrapped(presets=presets, sinks=[log, otel.sink])
    await moa_turn(client, "t")
    event = named(turn_span(otel), "moa.reference.timed_out")
    slow = next(u for u in log.of(moa_stream.CallUsage) if u.label == "m-slow")
    assert dict(event.attributes or {}) == {"moa.label": "m-slow", "moa.call_id": slow.call_id, "error.type": "timeout"}
    assert event.timestamp == int(slow.started_at * 1e9) + int(slow.duration_s * 1e9)  # when the call ended


async def test_a_reference_without_text_is_left_out_as_unusable(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    tool_only = Slot(model="m1", label="tool-only", extra={"tools": [WEATHER_TOOL], "tool_choice": "required"})
    presets = {"u": Preset(references=[tool_only, "m2"], aggregator="m1", quorum=1)}
    client = wrapped(presets=presets, sinks=[log, otel.sink])
    await moa_turn(client, "u")
    names = [name for name, _ in events(turn_span(otel))]
    assert names == ["moa.reference.unusable", "moa.quorum_met"]  # the quorum waited for text
    assert events(turn_span(otel))[0][1] == {"moa.layer": 1, "moa.label": "tool-only"}


async def test_a_layer_the_budget_held_short(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    presets = {"trio": Preset(references=["m1", "m2", "m3"], aggregator="m2")}
    client = wrapped(presets=presets, budget=Budget(turn=Limits(calls=2)), sinks=[log, otel.sink])
    await moa_turn(client, "trio")
    turn = turn_span(otel)
    assert events(turn) == [
        (
            "moa.budget.short",
            {
                "moa.layer": 1,
                "moa.budget.limit": "turn.calls",
                "moa.budget.policy": "fewer_references",
                "moa.budget.left_out": ("m2", "m3"),
            },
        )
    ]
    assert turn.start_time is not None
    assert turn.start_time <= turn.events[0].timestamp
    assert turn.status.status_code == StatusCode.UNSET  # the turn went on with what fitted


async def test_a_turn_the_budget_refused(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    presets = {"strict": Preset(references=["m1", "m2"], aggregator="m2", on_budget_short="refuse")}
    client = wrapped(presets=presets, budget=Budget(session=Limits(calls=2)), sinks=[log, otel.sink])
    with pytest.raises(moa_stream.BudgetExceeded):
        await moa_turn(client, "strict")
    await moa_stream.flush(client)
    turn = turn_span(otel)
    assert events(turn) == [("moa.budget.refused", {"moa.layer": 1, "moa.budget.limit": "session.calls"})]
    assert (turn.status.status_code, (turn.attributes or {})["moa.status"]) == (StatusCode.ERROR, "error")


async def test_the_aggregator_the_budget_refused(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    # The first layer holds the first attempt of the aggregator; its retry reserves its own, and
    # the turn's call limit has nothing left for it.
    presets = {"retry": Preset(references=["m1"], aggregator="m-fail", aggregator_retries=1)}
    client = wrapped(presets=presets, budget=Budget(turn=Limits(calls=2)), sinks=[log, otel.sink])
    with pytest.raises(moa_stream.BudgetExceeded):
        await moa_turn(client, "retry")
    await moa_stream.flush(client)
    [record] = log.of(moa_stream.TurnTrace)
    assert [(d.kind, d.layer, d.limit) for d in record.moa_events] == [("budget_refused", None, "turn.calls")]
    assert events(turn_span(otel)) == [("moa.budget.refused", {"moa.budget.limit": "turn.calls"})]


async def test_a_plain_turn_has_no_events(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    client = wrapped(presets={"duo": Preset(references=["m1", "m2"], aggregator="m1")}, sinks=[log, otel.sink])
    await moa_turn(client, "duo")
    assert events(turn_span(otel)) == []


def test_a_record_without_decisions_still_shows_its_budget_short_layers(otel: Telemetry) -> None:
    record = turn_of(call_usage(role="aggregator"), preset="p")
    short = moa_stream.BudgetShort(policy="aggregator_alone", layer=1, left_out=["a", "b"], limit="turn.calls")
    odd = [MoaDecision(kind="quorum_met", at=float("nan"), layer=-1), "not a decision"]
    otel.sink(msgspec.structs.replace(record, budget_short=[short], moa_events=odd))  # type: ignore[list-item]
    assert otel.sink.failed == 0
    assert events(turn_span(otel)) == [
        ("moa.quorum_met", {}),
        (
            "moa.budget.short",
            {
                "moa.layer": 1,
                "moa.budget.policy": "aggregator_alone",
                "moa.budget.limit": "turn.calls",
                "moa.budget.left_out": ("a", "b"),
            },
        ),
    ]
