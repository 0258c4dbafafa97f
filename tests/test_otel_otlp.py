"""The spans as a collector receives them: the real OTLP/HTTP exporter sends them to a receiver on
loopback, which decodes the protobuf payload; the turn's spans are under the caller's span."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import moa_stream
from moa_stream import Preset
from moa_stream._otel import OTelSink
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .scripted import Reply, Request, ScriptedUpstream
from .test_otel import USER

Wrapped = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
def sim() -> Simulator:
    return Simulator([SimModel(name="m1"), SimModel(name="m2"), SimModel(name="m3")])


@pytest.fixture
def collector() -> Iterator[ScriptedUpstream]:
    """An OTLP/HTTP receiver: takes any export and answers with an empty success."""
    answer = ExportTraceServiceResponse().SerializeToString()

    def receive(request: Request) -> Reply:
        return Reply(headers=[("content-type", "application/x-protobuf")], parts=[answer] if answer else [])

    with ScriptedUpstream(receive) as running:
        yield running


@pytest.fixture
def tracer_provider(collector: ScriptedUpstream) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{collector.base_url}/traces")))
    yield provider
    provider.shutdown()


def received(collector: ScriptedUpstream) -> dict[str, list[tuple[str, Span]]]:
    """Every span the collector received, by name, with the name of its instrumentation scope."""
    spans: dict[str, list[tuple[str, Span]]] = {}
    for request in collector.requests:
        assert (request.method, request.path) == ("POST", "/v1/traces")
        assert request.headers["content-type"] == "application/x-protobuf"
        body = gzip.decompress(request.body) if request.headers.get("content-encoding") == "gzip" else request.body
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    spans.setdefault(span.name, []).append((scope.scope.name, span))
    return spans


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(item) for item in any_value.array_value.values)
    return getattr(any_value, kind) if kind else None


def attributes(item: Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in item.attributes}


async def chat(client: openai.AsyncOpenAI, model: str, *, stream: bool) -> None:
    if stream:
        response = await client.chat.completions.create(model=model, messages=USER, stream=True)  # type: ignore[arg-type]
        async for _ in response:
            pass
    else:
        await client.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_the_collector_sees_the_turn_spans_under_the_callers_span(
    wrapped: Wrapped,
    log: EventLog,
    collector: ScriptedUpstream,
    tracer_provider: TracerProvider,
    stream: bool,
) -> None:
    presets = {"duo": Preset(references=["m1", "m2"], aggregator="m3", quorum=2)}
    client = wrapped(presets=presets, sinks=[log, OTelSink(tracer_provider=tracer_provider)])
    with tracer_provider.get_tracer("app").start_as_current_span("my-request"):
        await chat(client, "moa:duo", stream=stream)
        await chat(client, "m1", stream=stream)
    await moa_stream.flush(client)
    assert tracer_provider.force_flush(10_000)

    spans = received(collector)
    [(_, mine)] = spans["my-request"]
    [(scope, turn)] = spans["invoke_agent moa:duo"]
    assert scope == "moa_stream"
    assert (turn.parent_span_id, turn.trace_id) == (mine.span_id, mine.trace_id)
    assert turn.kind == Span.SpanKind.SPAN_KIND_INTERNAL
    turn_attributes = attributes(turn)
    assert turn_attributes["gen_ai.operation.name"] == "invoke_agent"
    assert turn_attributes["gen_ai.agent.name"] == "moa:duo"
    assert turn_attributes["gen_ai.provider.name"] == "openai"
    assert turn_attributes["gen_ai.request.stream"] is stream
    [met] = turn.events
    assert (met.name, attributes(met)["moa.quorum"], attributes(met)["moa.references.succeeded"]) == (
        "moa.quorum_met",
        2,
        2,
    )
    assert turn.start_time_unix_nano <= met.time_unix_nano <= turn.end_time_unix_nano

    chats = [span for _, span in spans["chat m1"] + spans["chat m2"] + spans["chat m3"]]
    assert len(chats) == 4  # two references, the aggregator, the direct call
    under_turn = [span for span in chats if span.parent_span_id == turn.span_id]
    [direct] = [span for span in chats if span.parent_span_id == mine.span_id]
    assert sorted(span.name for span in under_turn) == ["chat m1", "chat m2", "chat m3"]
    assert direct.name == "chat m1"
    usages = {usage.call_id: usage for usage in log.of(moa_stream.CallUsage)}
    for span in chats:
        assert span.trace_id == mine.trace_id
        assert span.kind == Span.SpanKind.SPAN_KIND_CLIENT
        seen = attributes(span)
        usage = usages[seen["moa.call_id"]]
        assert seen["gen_ai.provider.name"] == "openai"
        assert seen["server.address"] == usage.provider
        assert seen["gen_ai.request.model"] == span.name.removeprefix("chat ")
        assert seen["gen_ai.usage.input_tokens"] == usage.input_tokens
        assert seen["gen_ai.usage.output_tokens"] == usage.output_tokens
        assert (span.start_time_unix_nano, span.end_time_unix_nano) == (
            int(usage.started_at * 1e9),
            int(usage.started_at * 1e9) + int(usage.duration_s * 1e9),
        )
        called_streamed = stream or seen["moa.role"] == "reference"  # references always stream
        assert seen["gen_ai.request.stream"] is called_streamed
        assert ("gen_ai.response.time_to_first_chunk" in seen) is called_streamed
