"""Spans that join the caller's trace: the turn's spans are children of the span current where the
turn started, and with `propagate_trace=True` every upstream request carries it as W3C headers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState

import moa_stream
from moa_stream import Preset
from moa_stream._events import TraceContext
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .test_otel import USER, Telemetry

Wrapped = Callable[..., openai.AsyncOpenAI]
DUO = {"duo": Preset(references=["m1", "m2"], aggregator="m3")}
# A remote parent as a traced web framework would have it: a trace id, a span id, sampled, and a
# vendor's tracestate.
TRACE_ID, SPAN_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0x00F067AA0BA902B7
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
TRACESTATE = "vendor=v1,other=x"


@pytest.fixture
def sim() -> Simulator:
    return Simulator([SimModel(name="m1"), SimModel(name="m2"), SimModel(name="m3")])


@pytest.fixture
def otel() -> Telemetry:
    return Telemetry()


@pytest.fixture
def remote_parent() -> Iterator[None]:
    """The caller's current span is a remote one, with a tracestate (what an incoming request sets)."""
    context = SpanContext(
        TRACE_ID,
        SPAN_ID,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState.from_header([TRACESTATE]),
    )
    with trace.use_span(NonRecordingSpan(context)):
        yield


async def chat(client: openai.AsyncOpenAI, model: str, *, stream: bool, messages: list[Any] = USER) -> None:
    if stream:
        response = await client.chat.completions.create(model=model, messages=messages, stream=True)
        async for _ in response:
            pass
    else:
        await client.chat.completions.create(model=model, messages=messages)


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_turn_spans_are_children_of_the_callers_span(
    wrapped: Wrapped, log: EventLog, otel: Telemetry, stream: bool
) -> None:
    client = wrapped(presets=DUO, sinks=[log, otel.sink])
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("my-request") as request:
        await chat(client, "moa:duo", stream=stream)
        await chat(client, "m1", stream=stream)
    await moa_stream.flush(client)
    spans = otel.spans()
    [mine] = named(spans, "my-request")
    [turn] = named(spans, "invoke_agent moa:duo")
    assert mine.context is not None
    assert turn.context is not None
    assert mine.context == request.get_span_context()
    assert turn.parent is not None
    assert (turn.parent.span_id, turn.parent.trace_id) == (mine.context.span_id, mine.context.trace_id)
    assert turn.parent.is_remote  # rebuilt from the W3C headers, on the sink's thread
    moa_calls = [s for s in otel.client_spans() if s.parent is not None and s.parent.span_id == turn.context.span_id]
    assert sorted(s.name for s in moa_calls) == ["chat m1", "chat m2", "chat m3"]
    [direct] = [s for s in otel.client_spans() if s not in moa_calls]
    assert direct.name == "chat m1"
    assert direct.parent is not None
    assert direct.parent.span_id == mine.context.span_id
    for span in [turn, *moa_calls, direct]:
        assert span.context is not None
        assert span.context.trace_id == mine.context.trace_id
    [aggregator] = [s for s in moa_calls if s.name == "chat m3"]
    for span in (aggregator, direct, turn):  # the caller's request, as it asked (references always stream)
        assert (span.attributes or {})["gen_ai.request.stream"] is stream


async def test_a_remote_parent_keeps_its_trace_id_span_id_and_tracestate(
    wrapped: Wrapped, log: EventLog, otel: Telemetry, remote_parent: None
) -> None:
    client = wrapped(presets=DUO, sinks=[log, otel.sink])
    await chat(client, "moa:duo", stream=True)
    await moa_stream.flush(client)
    [record] = log.of(moa_stream.TurnTrace)
    assert record.parent == TraceContext(traceparent=TRACEPARENT, tracestate=TRACESTATE)
    [turn] = [span for span in otel.spans() if span.kind == SpanKind.INTERNAL]
    assert turn.parent is not None
    assert (turn.parent.trace_id, turn.parent.span_id) == (TRACE_ID, SPAN_ID)
    for span in otel.spans():
        assert span.context is not None
        assert span.context.trace_id == TRACE_ID
        assert span.context.trace_state.to_header() == TRACESTATE  # inherited, as W3C asks


async def test_without_a_current_span_the_turn_span_is_a_root(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    client = wrapped(presets=DUO, sinks=[log, otel.sink])
    await chat(client, "moa:duo", stream=False)
    await chat(client, "m1", stream=False)
    await moa_stream.flush(client)
    assert [record.parent for record in log.of(moa_stream.TurnTrace)] == [None, None]
    roots = [span for span in otel.spans() if span.parent is None]
    assert sorted(span.name for span in roots) == ["chat m1", "invoke_agent moa:duo"]


async def test_the_caller_context_is_read_only_for_a_sink_that_wants_it(
    wrapped: Wrapped, log: EventLog, remote_parent: None
) -> None:
    client = wrapped(sinks=[log])  # no OTelSink, no propagate_trace: nothing reads the context
    await chat(client, "m1", stream=False)
    await moa_stream.flush(client)
    [record] = log.of(moa_stream.TurnTrace)
    assert record.parent is None


def test_an_invalid_parent_leaves_the_span_a_root(otel: Telemetry) -> None:
    from .test_otel import call_usage, turn_of

    for traceparent in ("garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"):
        record = turn_of(call_usage())
        otel.sink(moa_stream.TurnTrace(**{**_fields(record), "parent": TraceContext(traceparent=traceparent)}))
    assert otel.sink.failed == 0
    assert [span.parent for span in otel.spans()] == [None, None]


def _fields(record: moa_stream.TurnTrace) -> dict[str, object]:
    return {name: getattr(record, name) for name in record.__struct_fields__}


# -- propagate_trace: the upstreams join the trace too ------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_propagate_trace_sends_the_callers_span_to_every_upstream(
    wrapped: Wrapped, sim: Simulator, remote_parent: None, stream: bool
) -> None:
    client = wrapped(presets=DUO, propagate_trace=True)
    await chat(client, "m1", stream=stream)
    await chat(client, "moa:duo", stream=stream)
    await moa_stream.flush(client)
    models = [request["model"] for request in sim.requests_seen]
    assert sorted(models) == ["m1", "m1", "m2", "m3"]  # the direct call, both references, the aggregator
    for headers in sim.headers_seen:
        assert headers["traceparent"] == TRACEPARENT
        assert headers["tracestate"] == TRACESTATE


async def test_propagate_trace_sends_the_span_of_each_turn(wrapped: Wrapped, sim: Simulator, otel: Telemetry) -> None:
    client = wrapped(presets=DUO, propagate_trace=True)
    tracer = otel.tracer_provider.get_tracer("app")
    sent = []
    for question in ("one?", "two?"):  # two user turns: the second reuses no reference
        with tracer.start_as_current_span("my-request") as request:
            await chat(client, "moa:duo", stream=True, messages=[{"role": "user", "content": question}])
            context = request.get_span_context()
            sent.append(f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}")
    await moa_stream.flush(client)
    assert [headers["traceparent"] for headers in sim.headers_seen] == [sent[0]] * 3 + [sent[1]] * 3
    assert not any("tracestate" in headers for headers in sim.headers_seen)  # none to send


async def test_without_propagate_trace_no_upstream_sees_the_trace(
    wrapped: Wrapped, sim: Simulator, otel: Telemetry, remote_parent: None
) -> None:
    client = wrapped(presets=DUO, sinks=[otel.sink])  # the sink reads the context; nothing sends it
    await chat(client, "m1", stream=True)
    await chat(client, "moa:duo", stream=False)
    await moa_stream.flush(client)
    assert len(sim.headers_seen) == 4
    assert not any({"traceparent", "tracestate"} & set(headers) for headers in sim.headers_seen)
