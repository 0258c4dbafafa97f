"""An OpenTelemetry sink: GenAI spans and metrics built from the turn records, after the fact.

Events arrive once a call or a turn has ended, on the dispatcher's worker thread, so every span is
created here with explicit start and end times and an explicit parent: nothing is attached to the
current context and nothing runs inside the caller's stream. The parent is the span that was
current in the caller's code when the turn started (`TurnTrace.parent`, which the client reads
because this sink `wants_trace_context`), so the turn's spans join the caller's trace; without one
they are roots. Names and attributes follow the OpenTelemetry GenAI semantic conventions
(development status; `gen_ai.provider.name`, not the deprecated `gen_ai.system`):

- a MoA turn is one INTERNAL span `invoke_agent moa:<preset>` (an in-process agent; its
  `gen_ai.agent.name` is `moa:<preset>`) with one CLIENT span `chat <model>` per upstream call
  under it, references and aggregator alike, and its decisions as span events (`_otel_events`);
- a direct turn is its single upstream call, so it is one CLIENT span `chat <model>` and nothing
  else: a second `chat` span around it would make GenAI-aware backends count the call twice.

`gen_ai.provider.name` by upstream host: `api.openai.com` is `openai`; `*.openai.azure.com` and
`*.cognitiveservices.azure.com` are `azure.ai.openai`; the other well-known values where their
host is the upstream (`anthropic`, `deepseek`, `groq`, `mistral_ai`, `x_ai`, `perplexity`, `cohere`,
`gcp.gemini`, `gcp.vertex_ai`); any other host (vLLM, llama.cpp, a gateway, the simulator) is
`openai`, as the conventions take the provider from the client library when the real one is not
known, and `server.address` names the host (`server.port` is set where the host alone tells it:
443 for the well-known APIs).

Metrics (histograms with the conventions' bucket boundaries): `gen_ai.client.token.usage` by
`gen_ai.token.type`, `gen_ai.client.operation.duration` and, for streamed calls,
`gen_ai.client.operation.time_to_first_chunk`, one observation set per upstream call.

`error.type` is the HTTP status code (`"429"`), `timeout`, `malformed_response`, `stream_error`,
the exception's class name, or `_OTHER`. Calls that were cancelled or closed early are not errors;
their status is in `moa.status`. Message content is opt-in (`capture_content`, `_otel_content`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import metadata
from typing import Final

from ._events import CallRecord, CallUsage, Event, TraceContext, TurnTrace

try:
    from opentelemetry import metrics, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("moa_stream's OpenTelemetry sink needs the `otel` extra: pip install 'moa-stream[otel]'") from exc

from ._otel_attrs import (
    as_list,
    conversation,
    count,
    description,
    error_type,
    flag,
    has_response,
    interval,
    is_moa,
    main_call,
    money,
    provider_name,
    put,
    request_model,
    seconds,
    server_port,
    streamed,
    text,
    total,
)
from ._otel_content import input_messages, output_messages, system_instructions
from ._otel_events import moa_span_events

__all__ = ["OTelSink", "error_type", "provider_name"]

logger = logging.getLogger("moa_stream")

_SCOPE: Final = "moa_stream"
_propagator: Final = TraceContextTextMapPropagator()

# The bucket boundaries the GenAI conventions ask for.
_TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
_SECONDS_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip


def _histogram(
    meter: metrics.Meter, name: str, unit: str, description: str, buckets: Sequence[float]
) -> metrics.Histogram:
    try:
        return meter.create_histogram(name, unit, description, explicit_bucket_boundaries_advisory=buckets)
    except TypeError:  # opentelemetry-api before 1.30 has no bucket advice: the SDK's defaults apply
        return meter.create_histogram(name, unit, description)


def _package_version() -> str:
    try:
        return metadata.version("moa-stream")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return ""


def _caller_context(parent: object) -> Context:
    """The caller's span as a remote parent, or an empty context (a root span) without a valid one."""
    if not isinstance(parent, TraceContext) or not isinstance(parent.traceparent, str):
        return Context()
    carrier = {"traceparent": parent.traceparent}
    if isinstance(parent.tracestate, str):
        carrier["tracestate"] = parent.tracestate
    # A fresh context, never the sink thread's current one; an invalid header leaves it empty.
    return _propagator.extract(carrier, context=Context())


class OTelSink:
    """A sink that exports every turn to OpenTelemetry: spans per call under a span per MoA turn,
    children of the caller's span where the turn started, and the GenAI client metrics. Use it as
    `moa_stream.wrap(client, sinks=[OTelSink()])`.

    `tracer_provider` and `meter_provider` default to the global ones (looked up lazily, so a
    provider installed after the sink was made is still used). Token counts that moa_stream
    estimated (the upstream reported none) are on the spans, flagged by `moa.usage_source`, but go
    into `gen_ai.client.token.usage` only with `count_estimated_tokens=True`, as the conventions
    make offline token counting opt-in. `capture_content=True` adds each call's messages
    (`gen_ai.input.messages`, `gen_ai.output.messages`), always after the client's `redact=`.
    The sink never raises: odd values are left out.
    """

    wants_trace_context: Final = True
    """Asks the client to read the caller's current span as each turn starts (`TurnTrace.parent`)."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        count_estimated_tokens: bool = False,
        capture_content: bool = False,
    ) -> None:
        version = _package_version()
        self._tracer = trace.get_tracer(_SCOPE, version, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, version, meter_provider=meter_provider)
        self._count_estimated = count_estimated_tokens
        self._capture_content = capture_content
        self._token_usage = _histogram(
            meter, "gen_ai.client.token.usage", "{token}", "Number of input and output tokens used.", _TOKEN_BUCKETS
        )
        self._duration = _histogram(
            meter, "gen_ai.client.operation.duration", "s", "GenAI operation duration.", _SECONDS_BUCKETS
        )
        self._time_to_first_chunk = _histogram(
            meter,
            "gen_ai.client.operation.time_to_first_chunk",
            "s",
            "Time to receive the first chunk of a streamed response.",
            _SECONDS_BUCKETS,
        )
        self.failed = 0
        """Turns or calls that could not be exported (logged once, then counted)."""

    def __call__(self, event: Event) -> None:
        # Only the turn record is used: it carries every call's usage and timing, and the parent
        # span can only be made once all of them are known.
        if isinstance(event, TurnTrace):
            self.export_turn(event)

    def export_turn(self, record: TurnTrace) -> None:
        """Create the spans and record the metrics of one finished turn; never raises."""
        try:
            calls = [
                call
                for call in as_list(record.calls)
                if isinstance(call, CallRecord) and isinstance(call.usage, CallUsage)
            ]
            caller = _caller_context(getattr(record, "parent", None))
            if is_moa(record):
                self._moa_turn(record, calls, caller)
            else:
                for call in calls:
                    self._call(record, call, caller)
        except Exception:
            self._failed("turn")

    # -- spans ----------------------------------------------------------------------------------

    def _moa_turn(self, record: TurnTrace, calls: list[CallRecord], caller: Context) -> None:
        end: object = record.end

        def at(field: str) -> object:  # a hand-made record may hold anything, or nothing
            return getattr(end, field, None)

        agent = text(record.model) or (f"moa:{record.preset}" if text(record.preset) else "")
        main = main_call(calls)
        host = text(main.provider) if main is not None else ""
        attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": "invoke_agent"}
        put(attributes, "gen_ai.agent.name", agent)
        put(attributes, "gen_ai.provider.name", provider_name(host) if host else None)
        put(attributes, "gen_ai.conversation.id", conversation(record.session_id))
        put(attributes, "moa.session_id", text(record.session_id))
        put(attributes, "moa.turn_id", text(record.turn_id))
        put(attributes, "moa.preset", text(record.preset))
        put(attributes, "moa.cadence", text(record.cadence))
        put(attributes, "moa.aggregator_wait_s", seconds(record.aggregator_wait_s))
        status = text(at("status"))
        put(attributes, "moa.status", status)
        put(attributes, "moa.calls", count(at("calls")))
        put(attributes, "moa.failed_calls", count(at("failed_calls")))
        # The aggregator's request is the caller's, so it streams when the caller's did.
        answered_streamed = streamed(main) if main is not None else None
        put(attributes, "gen_ai.request.stream", answered_streamed)
        if answered_streamed is not False:
            put(attributes, "gen_ai.response.time_to_first_chunk", seconds(at("ttft_s")))
        # The turn's totals, each only when every call knows it: a lower bound (or a 0 standing
        # for "not reported") under a `gen_ai.usage.*` name would read as the real total.
        usages = [call.usage for call in calls if call.usage.usage_source in ("reported", "estimated")]
        if calls and len(usages) == len(calls):
            put(attributes, "gen_ai.usage.input_tokens", total(u.input_tokens for u in usages))
            put(attributes, "gen_ai.usage.output_tokens", total(u.output_tokens for u in usages))
            put(attributes, "gen_ai.usage.cache_read.input_tokens", total(u.cached_input_tokens for u in usages))
            put(attributes, "gen_ai.usage.reasoning.output_tokens", total(u.reasoning_tokens for u in usages))
        put(attributes, "moa.usage_complete", flag(at("usage_complete")))
        put(attributes, "moa.cost_usd", money(at("cost_usd")))
        put(attributes, "moa.cost_complete", flag(at("cost_complete")))
        # A failed turn failed in its aggregator, or before it (every reference failed).
        failed = main if main is not None else next((c for c in calls if c.usage.status == "error"), None)
        if status == "error":
            attributes["error.type"] = (error_type(failed.usage) if failed is not None else None) or "_OTHER"

        start_ns, end_ns = interval(at("started_at"), at("duration_s"))
        span = self._tracer.start_span(
            f"invoke_agent {agent}" if agent else "invoke_agent",
            context=caller,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=start_ns,
        )
        try:
            for event in moa_span_events(record, calls):
                span.add_event(event.name, event.attributes, timestamp=event.at_ns)
            parent = trace.set_span_in_context(span, Context())
            for call in calls:
                self._call(record, call, parent)
            if status == "error":
                span.set_status(Status(StatusCode.ERROR, description(failed.usage) if failed is not None else None))
        finally:
            span.end(end_time=end_ns)

    def _call(self, record: TurnTrace, call: CallRecord, parent: Context) -> None:
        try:
            self._export_call(record, call, parent)
        except Exception:
            self._failed("call")

    def _export_call(self, record: TurnTrace, call: CallRecord, parent: Context) -> None:
        usage = call.usage
        model = request_model(call)
        host = text(call.provider)
        provider = provider_name(host) if host else None
        port = server_port(host) if host else None
        response_model = text(usage.model) if has_response(call) else None
        failure = error_type(usage)
        is_stream = streamed(call)

        attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": "chat"}
        put(attributes, "gen_ai.provider.name", provider)
        put(attributes, "gen_ai.request.model", model)
        put(attributes, "server.address", host)
        put(attributes, "server.port", port)
        put(attributes, "gen_ai.conversation.id", conversation(usage.session_id))
        put(attributes, "gen_ai.request.stream", is_stream)
        put(attributes, "gen_ai.response.model", response_model)
        finish = text(call.finish_reason) or text(usage.finish_reason)
        if finish:
            attributes["gen_ai.response.finish_reasons"] = (finish,)
        if usage.usage_source in ("reported", "estimated"):
            put(attributes, "gen_ai.usage.input_tokens", count(usage.input_tokens))
            put(attributes, "gen_ai.usage.output_tokens", count(usage.output_tokens))
            put(attributes, "gen_ai.usage.cache_read.input_tokens", count(usage.cached_input_tokens))
            put(attributes, "gen_ai.usage.cache_creation.input_tokens", count(usage.cache_write_tokens))
            put(attributes, "gen_ai.usage.reasoning.output_tokens", count(usage.reasoning_tokens))
        ttft = seconds(usage.ttft_s) if is_stream is not False else None
        put(attributes, "gen_ai.response.time_to_first_chunk", ttft)
        put(attributes, "http.response.status_code", count(usage.http_status))
        put(attributes, "error.type", failure)
        put(attributes, "moa.role", text(usage.role))
        put(attributes, "moa.label", text(usage.label))
        put(attributes, "moa.usage_source", text(usage.usage_source))
        put(attributes, "moa.cost_usd", money(usage.cost_usd))
        put(attributes, "moa.session_id", text(usage.session_id) or text(record.session_id))
        put(attributes, "moa.turn_id", text(usage.turn_id) or text(record.turn_id))
        put(attributes, "moa.call_id", text(usage.call_id))
        put(attributes, "moa.request_id", text(usage.request_id))
        put(attributes, "moa.status", text(usage.status))
        if call.api == "responses":  # the Responses API: its id chains a conversation across spans
            attributes["moa.api"] = "responses"
            put(attributes, "gen_ai.response.id", text(call.response_id))
            put(attributes, "moa.previous_response_id", text(call.previous_response_id))
        if self._capture_content:
            put(attributes, "gen_ai.input.messages", input_messages(call))
            put(attributes, "gen_ai.output.messages", output_messages(call))
            put(attributes, "gen_ai.system_instructions", system_instructions(call))

        start_ns, end_ns = interval(usage.started_at, usage.duration_s)
        span = self._tracer.start_span(
            f"chat {model}" if model else "chat",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=start_ns,
        )
        if failure is not None:
            span.set_status(Status(StatusCode.ERROR, description(usage)))
        span.end(end_time=end_ns)

        # -- metrics: low-cardinality attributes only (no ids, no labels)
        dimensions: dict[str, AttributeValue] = {"gen_ai.operation.name": "chat"}
        put(dimensions, "gen_ai.provider.name", provider)
        put(dimensions, "gen_ai.request.model", model)
        put(dimensions, "gen_ai.response.model", response_model)
        put(dimensions, "server.address", host)
        put(dimensions, "server.port", port)
        put(dimensions, "moa.role", text(usage.role))
        duration = seconds(usage.duration_s)
        if duration is not None:
            timed = dict(dimensions)
            put(timed, "error.type", failure)
            self._duration.record(duration, timed)
        if ttft is not None:
            self._time_to_first_chunk.record(ttft, dimensions)
        if usage.usage_source == "reported" or (self._count_estimated and usage.usage_source == "estimated"):
            for token_type, tokens in (("input", count(usage.input_tokens)), ("output", count(usage.output_tokens))):
                if tokens is not None:
                    self._token_usage.record(tokens, {**dimensions, "gen_ai.token.type": token_type})

    def _failed(self, what: str) -> None:
        if self.failed == 0:
            logger.exception("moa_stream OTelSink could not export a %s; further failures are only counted", what)
        self.failed += 1
