"""The OpenTelemetry sink: GenAI spans and metrics from real turns on the simulator, in-memory exporters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import moa_stream
from moa_stream import Preset
from moa_stream._otel import OTelSink, error_type, provider_name
from moa_stream._otel_attrs import server_port
from moa_stream.testing import Fault, SimModel, Simulator

from .conftest import EventLog

USER = [{"role": "user", "content": "Name three rivers"}]
PRICES = {
    "m1": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
    "m2": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
    "m3": {"input_cost_per_token": 3e-6, "output_cost_per_token": 6e-6},
}
Wrapped = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
def sim() -> Simulator:
    return Simulator(
        [
            SimModel(name="m1"),
            SimModel(name="m2"),
            SimModel(name="m3"),
            SimModel(name="m-reasoner", reasoning_tokens=6),
            SimModel(name="m-fail", fault=Fault(kind="http_500")),
            SimModel(name="m-slow", fault=Fault(kind="stall", after_chunks=3)),
        ]
    )


class Telemetry:
    """An OTelSink on a local TracerProvider and MeterProvider (never the global ones)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.sink = OTelSink(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def client_spans(self) -> list[ReadableSpan]:
        return [span for span in self.spans() if span.kind == SpanKind.CLIENT]

    def points(self, metric: str) -> list[HistogramDataPoint]:
        data = self.reader.get_metrics_data()
        found: list[HistogramDataPoint] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(p for p in item.data.data_points if isinstance(p, HistogramDataPoint))
        return found


@pytest.fixture
def otel() -> Telemetry:
    return Telemetry()


async def moa_turn(client: openai.AsyncOpenAI, preset: str, **options: Any) -> None:
    stream = await client.chat.completions.create(
        model=f"moa:{preset}",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        **options,
    )
    async for _ in stream:
        pass
    await moa_stream.flush(client)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def by_label(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {attrs(span)["moa.label"]: span for span in spans}


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


async def test_moa_turn_is_one_agent_span_with_a_client_span_per_call_under_it(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(presets={"duo": Preset(references=["m1", "m2"], aggregator="m3")}, sinks=[log, otel.sink])
    await moa_turn(client, "duo")
    usages = log.of(moa_stream.CallUsage)
    [turn] = [span for span in otel.spans() if span.kind == SpanKind.INTERNAL]
    calls = otel.client_spans()

    assert len(calls) == len(usages) == 3
    assert {attrs(span)["moa.call_id"] for span in calls} == {u.call_id for u in usages}
    assert turn.parent is None
    assert turn.context is not None
    for span in calls:
        assert span.parent is not None
        assert span.parent.span_id == turn.context.span_id
        assert span.context is not None
        assert span.context.trace_id == turn.context.trace_id
    assert turn.name == "invoke_agent moa:duo"
    [end] = log.of(moa_stream.TurnEnd)
    assert attrs(turn)["gen_ai.operation.name"] == "invoke_agent"
    assert attrs(turn)["gen_ai.agent.name"] == "moa:duo"
    assert attrs(turn)["moa.turn_id"] == end.turn_id
    assert "gen_ai.conversation.id" not in attrs(turn)  # the per-process default session is no conversation
    assert attrs(turn)["moa.status"] == "completed"
    assert attrs(turn)["gen_ai.usage.input_tokens"] == end.input_tokens
    assert attrs(turn)["gen_ai.usage.output_tokens"] == end.output_tokens
    assert attrs(turn)["moa.cost_usd"] == pytest.approx(end.cost_usd)
    assert (turn.start_time, turn.end_time) == (ns(end.started_at), ns(end.started_at) + ns(end.duration_s))
    assert turn.status.status_code == StatusCode.UNSET


async def test_client_spans_carry_the_genai_attributes_of_their_call(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(
        presets={"duo": Preset(references=["m1", "m2"], aggregator="m3")}, prices=PRICES, sinks=[log, otel.sink]
    )
    await moa_turn(client, "duo", stream_options={"include_usage": True})
    spans = by_label(otel.client_spans())
    for usage in log.of(moa_stream.CallUsage):
        span = spans[usage.label]
        assert span.name == f"chat {usage.model}"
        assert span.kind == SpanKind.CLIENT
        assert (span.start_time, span.end_time) == (ns(usage.started_at), ns(usage.started_at) + ns(usage.duration_s))
        expected = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",  # not a well-known host: the client library's provider
            "gen_ai.request.model": usage.model,
            "gen_ai.response.model": usage.model,
            "gen_ai.request.stream": True,  # references and aggregator are always streamed
            "gen_ai.response.finish_reasons": ("stop",),
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": 0,  # the simulator reports it (as 0)
            "gen_ai.usage.reasoning.output_tokens": 0,
            "gen_ai.response.time_to_first_chunk": usage.ttft_s,
            "http.response.status_code": 200,
            "server.address": usage.provider,
            "moa.role": usage.role,
            "moa.label": usage.label,
            "moa.usage_source": "reported",
            "moa.cost_usd": usage.cost_usd,
            "moa.session_id": usage.session_id,
            "moa.turn_id": usage.turn_id,
            "moa.call_id": usage.call_id,
            "moa.request_id": usage.request_id,
            "moa.status": "completed",
        }
        assert attrs(span) == {key: value for key, value in expected.items() if value is not None}
        assert span.status.status_code == StatusCode.UNSET
    assert sorted(attrs(s)["moa.role"] for s in spans.values()) == ["aggregator", "reference", "reference"]


async def test_direct_turn_is_a_single_client_span(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    client = wrapped(sinks=[log, otel.sink])
    with moa_stream.session("alice"):
        await client.chat.completions.create(model="m-reasoner", messages=USER)  # type: ignore[arg-type]
    await moa_stream.flush(client)
    [span] = otel.spans()
    [usage] = log.of(moa_stream.CallUsage)
    assert (span.name, span.kind, span.parent) == ("chat m-reasoner", SpanKind.CLIENT, None)
    assert attrs(span)["gen_ai.conversation.id"] == attrs(span)["moa.session_id"] == "alice"
    assert attrs(span)["gen_ai.request.stream"] is False
    assert attrs(span)["gen_ai.usage.reasoning.output_tokens"] == usage.reasoning_tokens == 6
    assert attrs(span)["moa.role"] == "direct"
    assert "gen_ai.response.time_to_first_chunk" not in attrs(span)  # not streamed
    assert "moa.cost_usd" not in attrs(span)  # no price for m-reasoner: unknown, never 0


async def test_a_responses_call_is_a_client_span_with_its_response_id(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(sinks=[log, otel.sink])
    first = await client.responses.create(model="m-reasoner", input="hi")
    stream = await client.responses.create(model="m-reasoner", input="and?", previous_response_id=first.id, stream=True)
    async for _ in stream:
        pass
    await moa_stream.flush(client)
    spans = otel.spans()
    assert [span.name for span in spans] == ["chat m-reasoner", "chat m-reasoner"]
    one, two = (attrs(span) for span in spans)
    assert (one["moa.api"], one["gen_ai.response.id"]) == ("responses", first.id)
    assert two["moa.previous_response_id"] == first.id
    assert (two["gen_ai.request.stream"], two["gen_ai.usage.reasoning.output_tokens"]) == (True, 6)
    assert [u.output_tokens for u in log.of(moa_stream.CallUsage)] == [
        one["gen_ai.usage.output_tokens"],
        two["gen_ai.usage.output_tokens"],
    ]


async def test_failed_call_has_error_type_and_error_status(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    client = wrapped(sinks=[log, otel.sink])
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="m1",
            messages=USER,  # type: ignore[arg-type]
            extra_headers={"x-sim-fault": "http_429"},
        )
    await moa_stream.flush(client)
    [span] = otel.spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description is not None
    assert span.status.description.startswith("HTTP 429")
    assert attrs(span)["error.type"] == "429"
    assert attrs(span)["moa.status"] == "error"
    assert attrs(span)["moa.usage_source"] == "missing"
    assert not [key for key in attrs(span) if key.startswith("gen_ai.usage.")]  # unknown, never 0
    assert "gen_ai.response.model" not in attrs(span)  # no response named one


async def test_failed_reference_is_an_error_under_a_turn_that_succeeded(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(presets={"f": Preset(references=["m1", "m-fail"], aggregator="m3")}, sinks=[log, otel.sink])
    await moa_turn(client, "f")
    [turn] = [span for span in otel.spans() if span.kind == SpanKind.INTERNAL]
    spans = by_label(otel.client_spans())
    assert spans["m-fail"].status.status_code == StatusCode.ERROR
    assert attrs(spans["m-fail"])["error.type"] == "500"
    assert spans["m1"].status.status_code == StatusCode.UNSET
    assert turn.status.status_code == StatusCode.UNSET
    assert "error.type" not in attrs(turn)
    assert "gen_ai.usage.input_tokens" not in attrs(turn)  # one call's usage is missing: no false total


async def test_reference_timeout_is_error_type_timeout(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    presets = {"t": Preset(references=["m1", "m-slow"], aggregator="m3", reference_timeout=0.2)}
    client = wrapped(presets=presets, sinks=[log, otel.sink])
    await moa_turn(client, "t")
    span = by_label(otel.client_spans())["m-slow"]
    assert (span.status.status_code, attrs(span)["error.type"]) == (StatusCode.ERROR, "timeout")


async def test_cancelled_reference_is_not_an_error(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    presets = {"q": Preset(references=["m1", "m2", "m-slow"], aggregator="m3", quorum=2, grace=0.05)}
    client = wrapped(presets=presets, sinks=[log, otel.sink])
    await moa_turn(client, "q")
    slow = by_label(otel.client_spans())["m-slow"]
    assert attrs(slow)["moa.status"] == "cancelled"
    assert slow.status.status_code == StatusCode.UNSET
    assert "error.type" not in attrs(slow)
    assert attrs(slow)["moa.usage_source"] == "estimated"  # it answered in part


async def test_failed_aggregator_marks_the_turn_span_as_an_error(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(presets={"a": Preset(references=["m1"], aggregator="m-fail")}, sinks=[log, otel.sink])
    with pytest.raises(openai.InternalServerError):
        await moa_turn(client, "a")
    await moa_stream.flush(client)
    [turn] = [span for span in otel.spans() if span.kind == SpanKind.INTERNAL]
    assert turn.status.status_code == StatusCode.ERROR
    assert attrs(turn)["error.type"] == "500"
    assert attrs(turn)["moa.status"] == "error"


async def test_metrics_record_tokens_duration_and_time_to_first_chunk(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(sinks=[log, otel.sink])
    stream = await client.chat.completions.create(
        model="m1",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    async for _ in stream:
        pass
    await client.chat.completions.create(model="m1", messages=USER)  # type: ignore[arg-type]
    await moa_stream.flush(client)
    streamed, whole = log.of(moa_stream.CallUsage)
    assert streamed.ttft_s is not None

    tokens = {p.attributes["gen_ai.token.type"]: p for p in otel.points("gen_ai.client.token.usage") if p.attributes}
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].count == 2
    assert tokens["input"].sum == (streamed.input_tokens or 0) + (whole.input_tokens or 0)
    assert tokens["output"].sum == (streamed.output_tokens or 0) + (whole.output_tokens or 0)
    assert dict(tokens["input"].attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "m1",
        "gen_ai.response.model": "m1",
        "server.address": streamed.provider,
        "moa.role": "direct",
        "gen_ai.token.type": "input",
    }
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 2
    assert duration.sum == pytest.approx(streamed.duration_s + whole.duration_s)
    assert tuple(duration.explicit_bounds) == tuple(0.01 * 2**n for n in range(14))
    assert tuple(tokens["input"].explicit_bounds)[:3] == (1, 4, 16)  # the conventions' buckets, not the SDK's
    [first_chunk] = otel.points("gen_ai.client.operation.time_to_first_chunk")
    assert first_chunk.count == 1  # streamed calls only
    assert first_chunk.sum == pytest.approx(streamed.ttft_s)


async def test_failed_call_duration_carries_error_type_and_records_no_tokens(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(sinks=[log, otel.sink])
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m-fail", messages=USER)  # type: ignore[arg-type]
    await moa_stream.flush(client)
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert (duration.attributes or {})["error.type"] == "500"
    assert otel.points("gen_ai.client.token.usage") == []


async def test_estimated_tokens_reach_the_metric_only_when_asked(log: EventLog, otel: Telemetry) -> None:
    usage = call_usage(usage_source="estimated", input_tokens=10, output_tokens=5)
    otel.sink(turn_of(usage))
    assert otel.points("gen_ai.client.token.usage") == []
    assert attrs(otel.spans()[0])["gen_ai.usage.input_tokens"] == 10  # on the span, flagged
    counting = OTelSink(
        tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider, count_estimated_tokens=True
    )
    counting(turn_of(usage))
    assert sum(p.sum for p in otel.points("gen_ai.client.token.usage")) == 15


def call_usage(**fields: Any) -> moa_stream.CallUsage:
    values: dict[str, Any] = {
        "call_id": "c1",
        "turn_id": "t1",
        "session_id": "s1",
        "role": "direct",
        "label": "gpt-4.1",
        "model": "gpt-4.1",
        "provider": "api.openai.com",
        "started_at": 1_700_000_000.0,
        "duration_s": 1.5,
        "status": "completed",
    }
    return moa_stream.CallUsage(**(values | fields))


def turn_of(*usages: moa_stream.CallUsage, preset: str | None = None, **end_fields: Any) -> moa_stream.TurnTrace:
    end_values: dict[str, Any] = {
        "turn_id": "t1",
        "session_id": "s1",
        "model": f"moa:{preset}" if preset else "gpt-4.1",
        "calls": len(usages),
        "failed_calls": 0,
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "usage_complete": True,
        "cost_usd": 0.0,
        "cost_complete": True,
        "started_at": 1_700_000_000.0,
        "duration_s": 2.0,
        "status": "completed",
    }
    records = [
        moa_stream.CallRecord(
            call_id=u.call_id,
            role=u.role,
            label=u.label,
            model=u.model,
            provider=u.provider,
            input_messages=[],
            output=moa_stream.CallOutput(text="hi"),
            output_source="inline",
            usage=u,
        )
        for u in usages
    ]
    return moa_stream.TurnTrace(
        turn_id="t1",
        session_id="s1",
        model=end_values["model"],
        calls=records,
        end=moa_stream.TurnEnd(**(end_values | end_fields)),
        preset=preset,
    )


@pytest.mark.parametrize(
    ("host", "provider", "port"),
    [
        ("api.openai.com", "openai", 443),
        ("myres.openai.azure.com", "azure.ai.openai", 443),
        ("myres.cognitiveservices.azure.com", "azure.ai.openai", 443),
        ("API.Anthropic.com.", "anthropic", 443),
        ("api.groq.com", "groq", 443),
        ("generativelanguage.googleapis.com", "gcp.gemini", 443),
        ("europe-west4-aiplatform.googleapis.com", "gcp.vertex_ai", 443),
        # vLLM, llama.cpp, gateways, the simulator: OpenAI's API through OpenAI's client library
        ("127.0.0.1", "openai", None),
        ("vllm.internal", "openai", None),
        ("openrouter.ai", "openai", None),
        ("api.moonshot.ai", "openai", None),  # not one of the conventions' well-known values
    ],
)
def test_provider_name_is_the_well_known_value_of_the_host_else_openai(
    host: str, provider: str, port: int | None
) -> None:
    assert provider_name(host) == provider
    assert server_port(host) == port


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"status": "completed"}, None),
        ({"status": "cancelled"}, None),
        ({"status": "closed_early"}, None),
        ({"status": "error", "http_status": 503, "error": "HTTP 503: busy"}, "503"),
        ({"status": "error", "error": "timed out after 0.2s"}, "timeout"),
        ({"status": "error", "http_status": 200, "error": "in-stream error: overloaded"}, "stream_error"),
        ({"status": "error", "http_status": 200, "error": "malformed JSON in chunk: x"}, "malformed_response"),
        ({"status": "error", "http_status": 200, "error": "RemoteProtocolError: peer closed"}, "RemoteProtocolError"),
        ({"status": "error", "error": "ReadTimeout"}, "ReadTimeout"),
        ({"status": "error"}, "_OTHER"),
    ],
)
def test_error_type_is_a_low_cardinality_class_of_the_failure(fields: dict[str, Any], expected: str | None) -> None:
    assert error_type(call_usage(**fields)) == expected


def test_odd_data_is_left_out_and_never_raises(otel: Telemetry) -> None:
    odd = call_usage(
        model=None,
        provider=None,
        label=42,
        input_tokens=-3,
        output_tokens="many",
        cost_usd=float("nan"),
        ttft_s=float("inf"),
        started_at=float("nan"),
        duration_s=-1.0,
        status="error",
        http_status="teapot",
        usage_source="reported",
    )
    otel.sink(turn_of(odd, call_usage(call_id="c2"), preset="x"))
    otel.sink(turn_of(call_usage(), preset="y", started_at=None, status=None, duration_s="?"))
    otel.sink(moa_stream.TurnTrace(turn_id="t", session_id="s", model="m", calls=None, end=None))  # type: ignore[arg-type]
    otel.sink(moa_stream.TurnTrace(turn_id="t", session_id="s", model="moa:z", calls=[], end=None))  # type: ignore[arg-type]
    otel.sink(call_usage())  # not a turn record: ignored
    assert otel.sink.failed == 0
    agents = [span for span in otel.spans() if span.kind == SpanKind.INTERNAL]
    assert [span.name for span in agents] == ["invoke_agent moa:x", "invoke_agent moa:y", "invoke_agent moa:z"]
    odd_span = next(s for s in otel.client_spans() if attrs(s)["moa.call_id"] == "c1")
    assert odd_span.name == "chat"
    assert attrs(odd_span)["error.type"] == "_OTHER"
    for key in ("gen_ai.request.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "moa.cost_usd"):
        assert key not in attrs(odd_span)
    assert "gen_ai.response.time_to_first_chunk" not in attrs(odd_span)


def test_sink_made_with_the_global_providers_works_without_an_sdk_configured() -> None:
    sink = OTelSink()
    sink(turn_of(call_usage(), preset="p"))
    assert sink.failed == 0
