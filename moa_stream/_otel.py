"""An OpenTelemetry sink: GenAI spans and metrics built from the turn records, after the fact.

Events arrive once a call or a turn has ended, on the dispatcher's worker thread, so every span is
created here with explicit start and end times and an explicit parent: nothing is attached to the
current context and nothing runs inside the caller's stream. Names and attributes follow the
OpenTelemetry GenAI semantic conventions (development status; `gen_ai.provider.name`, not the
deprecated `gen_ai.system`):

- a MoA turn is one INTERNAL span `invoke_agent moa:<preset>` (an in-process agent; its
  `gen_ai.agent.name` is `moa:<preset>`) with one CLIENT span `chat <model>` per upstream call
  under it, references and aggregator alike;
- a direct turn is its single upstream call, so it is one CLIENT span `chat <model>` and nothing
  else: a second `chat` span around it would make GenAI-aware backends count the call twice.

Metrics (histograms with the conventions' bucket boundaries): `gen_ai.client.token.usage` by
`gen_ai.token.type`, `gen_ai.client.operation.duration` and, for streamed calls,
`gen_ai.client.operation.time_to_first_chunk`, one observation set per upstream call.

`error.type` is the HTTP status code (`"429"`), `timeout`, `malformed_response`, `stream_error`,
the exception's class name, or `_OTHER`. Calls that were cancelled or closed early are not errors;
their status is in `moa.status`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from typing import Final

from ._events import CallRecord, CallUsage, Event, TurnTrace
from ._session import _process_default

try:
    from opentelemetry import metrics, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("moa_stream's OpenTelemetry sink needs the `otel` extra: pip install 'moa-stream[otel]'") from exc

__all__ = ["OTelSink", "error_type", "provider_name"]

logger = logging.getLogger("moa_stream")

_SCOPE: Final = "moa_stream"

# The bucket boundaries the GenAI conventions ask for.
_TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
_SECONDS_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip

# Hosts whose provider has a well-known `gen_ai.provider.name` value (the conventions say it MUST be
# used where it applies); any other host is reported as it is.
_PROVIDERS: Final[Mapping[str, str]] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral_ai",
    "api.x.ai": "x_ai",
    "api.perplexity.ai": "perplexity",
    "api.moonshot.ai": "moonshot_ai",
    "api.cohere.com": "cohere",
    "api.cohere.ai": "cohere",
    "generativelanguage.googleapis.com": "gcp.gemini",
    "aiplatform.googleapis.com": "gcp.vertex_ai",
}
_PROVIDER_SUFFIXES: Final = ((".openai.azure.com", "azure.ai.openai"), ("-aiplatform.googleapis.com", "gcp.vertex_ai"))

_EXCEPTION_NAME: Final = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)(?::|$)")


def provider_name(host: str) -> str:
    """`gen_ai.provider.name` for an upstream host: the conventions' well-known value, else the host."""
    host = host.lower().rstrip(".")
    if host in _PROVIDERS:
        return _PROVIDERS[host]
    for suffix, name in _PROVIDER_SUFFIXES:
        if host.endswith(suffix):
            return name
    return host


def error_type(usage: CallUsage) -> str | None:
    """The low-cardinality `error.type` of a call that ended with status `error`, else None."""
    if usage.status != "error":
        return None
    status = usage.http_status
    if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
        return str(status)
    error = usage.error if isinstance(usage.error, str) else ""
    if error.startswith("timed out"):
        return "timeout"
    if error.startswith("malformed JSON"):
        return "malformed_response"
    if error.startswith(("in-stream error", "error in response body")):
        return "stream_error"
    if error.startswith("HTTP "):
        code = error[5:8]
        return code if code.isdigit() else "_OTHER"
    match = _EXCEPTION_NAME.match(error)
    return match.group(1) if match else "_OTHER"


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


class OTelSink:
    """A sink that exports every turn to OpenTelemetry: spans per call under a span per MoA turn,
    and the GenAI client metrics. Use it as `moa_stream.wrap(client, sinks=[OTelSink()])`.

    `tracer_provider` and `meter_provider` default to the global ones (looked up lazily, so a
    provider installed after the sink was made is still used). Token counts that moa_stream
    estimated (the upstream reported none) are on the spans, flagged by `moa.usage_source`, but go
    into `gen_ai.client.token.usage` only with `count_estimated_tokens=True`, as the conventions
    make offline token counting opt-in. The sink never raises: odd values are left out.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        count_estimated_tokens: bool = False,
    ) -> None:
        version = _package_version()
        self._tracer = trace.get_tracer(_SCOPE, version, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, version, meter_provider=meter_provider)
        self._count_estimated = count_estimated_tokens
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
                for call in _as_list(record.calls)
                if isinstance(call, CallRecord) and isinstance(call.usage, CallUsage)
            ]
            if _is_moa(record):
                self._moa_turn(record, calls)
            else:
                for call in calls:
                    self._call(record, call, Context())
        except Exception:
            self._failed("turn")

    # -- spans ----------------------------------------------------------------------------------

    def _moa_turn(self, record: TurnTrace, calls: list[CallRecord]) -> None:
        end: object = record.end

        def at(field: str) -> object:  # a hand-made record may hold anything, or nothing
            return getattr(end, field, None)

        agent = _text(record.model) or (f"moa:{record.preset}" if _text(record.preset) else "")
        main = _main_call(calls)
        provider = provider_name(main.provider) if main is not None and _text(main.provider) else None
        attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": "invoke_agent"}
        _put(attributes, "gen_ai.agent.name", agent)
        _put(attributes, "gen_ai.provider.name", provider)
        _put(attributes, "gen_ai.conversation.id", _conversation(record.session_id))
        _put(attributes, "moa.session_id", _text(record.session_id))
        _put(attributes, "moa.turn_id", _text(record.turn_id))
        _put(attributes, "moa.preset", _text(record.preset))
        _put(attributes, "moa.cadence", _text(record.cadence))
        _put(attributes, "moa.aggregator_wait_s", _seconds(record.aggregator_wait_s))
        status = _text(at("status"))
        _put(attributes, "moa.status", status)
        _put(attributes, "moa.calls", _count(at("calls")))
        _put(attributes, "moa.failed_calls", _count(at("failed_calls")))
        _put(attributes, "gen_ai.response.time_to_first_chunk", _seconds(at("ttft_s")))
        # The turn's totals, each only when every call knows it: a lower bound (or a 0 standing
        # for "not reported") under a `gen_ai.usage.*` name would read as the real total.
        usages = [call.usage for call in calls if call.usage.usage_source in ("reported", "estimated")]
        if calls and len(usages) == len(calls):
            _put(attributes, "gen_ai.usage.input_tokens", _total(u.input_tokens for u in usages))
            _put(attributes, "gen_ai.usage.output_tokens", _total(u.output_tokens for u in usages))
            _put(attributes, "gen_ai.usage.cache_read.input_tokens", _total(u.cached_input_tokens for u in usages))
            _put(attributes, "gen_ai.usage.reasoning.output_tokens", _total(u.reasoning_tokens for u in usages))
        _put(attributes, "moa.usage_complete", _flag(at("usage_complete")))
        _put(attributes, "moa.cost_usd", _money(at("cost_usd")))
        _put(attributes, "moa.cost_complete", _flag(at("cost_complete")))
        # A failed turn failed in its aggregator, or before it (every reference failed).
        failed = main if main is not None else next((c for c in calls if c.usage.status == "error"), None)
        if status == "error":
            attributes["error.type"] = (error_type(failed.usage) if failed is not None else None) or "_OTHER"

        start_ns, end_ns = _interval(at("started_at"), at("duration_s"))
        span = self._tracer.start_span(
            f"invoke_agent {agent}" if agent else "invoke_agent",
            context=Context(),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=start_ns,
        )
        try:
            parent = trace.set_span_in_context(span, Context())
            for call in calls:
                self._call(record, call, parent)
            if status == "error":
                span.set_status(Status(StatusCode.ERROR, _description(failed.usage) if failed is not None else None))
        finally:
            span.end(end_time=end_ns)

    def _call(self, record: TurnTrace, call: CallRecord, parent: Context) -> None:
        try:
            self._export_call(record, call, parent)
        except Exception:
            self._failed("call")

    def _export_call(self, record: TurnTrace, call: CallRecord, parent: Context) -> None:
        usage = call.usage
        request_model = _request_model(call)
        provider = provider_name(call.provider) if _text(call.provider) else None
        response_model = _text(usage.model) if _has_response(call) else None
        failure = error_type(usage)
        streamed = _streamed(call)

        attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": "chat"}
        _put(attributes, "gen_ai.provider.name", provider)
        _put(attributes, "gen_ai.request.model", request_model)
        _put(attributes, "server.address", _text(call.provider))
        _put(attributes, "gen_ai.conversation.id", _conversation(usage.session_id))
        _put(attributes, "gen_ai.request.stream", streamed)
        _put(attributes, "gen_ai.response.model", response_model)
        finish = _text(call.finish_reason) or _text(usage.finish_reason)
        if finish:
            attributes["gen_ai.response.finish_reasons"] = (finish,)
        known = usage.usage_source in ("reported", "estimated")
        if known:
            _put(attributes, "gen_ai.usage.input_tokens", _count(usage.input_tokens))
            _put(attributes, "gen_ai.usage.output_tokens", _count(usage.output_tokens))
            _put(attributes, "gen_ai.usage.cache_read.input_tokens", _count(usage.cached_input_tokens))
            _put(attributes, "gen_ai.usage.cache_creation.input_tokens", _count(usage.cache_write_tokens))
            _put(attributes, "gen_ai.usage.reasoning.output_tokens", _count(usage.reasoning_tokens))
        ttft = _seconds(usage.ttft_s)
        _put(attributes, "gen_ai.response.time_to_first_chunk", ttft)
        _put(attributes, "http.response.status_code", _count(usage.http_status))
        _put(attributes, "error.type", failure)
        _put(attributes, "moa.role", _text(usage.role))
        _put(attributes, "moa.label", _text(usage.label))
        _put(attributes, "moa.usage_source", _text(usage.usage_source))
        _put(attributes, "moa.cost_usd", _money(usage.cost_usd))
        _put(attributes, "moa.session_id", _text(usage.session_id) or _text(record.session_id))
        _put(attributes, "moa.turn_id", _text(usage.turn_id) or _text(record.turn_id))
        _put(attributes, "moa.call_id", _text(usage.call_id))
        _put(attributes, "moa.request_id", _text(usage.request_id))
        _put(attributes, "moa.status", _text(usage.status))
        if call.api == "responses":  # the Responses API: its id chains a conversation across spans
            attributes["moa.api"] = "responses"
            _put(attributes, "gen_ai.response.id", _text(call.response_id))
            _put(attributes, "moa.previous_response_id", _text(call.previous_response_id))

        start_ns, end_ns = _interval(usage.started_at, usage.duration_s)
        span = self._tracer.start_span(
            f"chat {request_model}" if request_model else "chat",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=start_ns,
        )
        if failure is not None:
            span.set_status(Status(StatusCode.ERROR, _description(usage)))
        span.end(end_time=end_ns)

        # -- metrics: low-cardinality attributes only (no ids, no labels)
        dimensions: dict[str, AttributeValue] = {"gen_ai.operation.name": "chat"}
        _put(dimensions, "gen_ai.provider.name", provider)
        _put(dimensions, "gen_ai.request.model", request_model)
        _put(dimensions, "gen_ai.response.model", response_model)
        _put(dimensions, "server.address", _text(call.provider))
        _put(dimensions, "moa.role", _text(usage.role))
        duration = _seconds(usage.duration_s)
        if duration is not None:
            timed = dict(dimensions)
            _put(timed, "error.type", failure)
            self._duration.record(duration, timed)
        if ttft is not None and streamed is not False:
            self._time_to_first_chunk.record(ttft, dimensions)
        if usage.usage_source == "reported" or (self._count_estimated and usage.usage_source == "estimated"):
            for token_type, count in (("input", _count(usage.input_tokens)), ("output", _count(usage.output_tokens))):
                if count is not None:
                    self._token_usage.record(count, {**dimensions, "gen_ai.token.type": token_type})

    def _failed(self, what: str) -> None:
        if self.failed == 0:
            logger.exception("moa_stream OTelSink could not export a %s; further failures are only counted", what)
        self.failed += 1


# -- reading odd data defensively: a missing or ill-typed field means "leave the attribute out" ------


def _is_moa(record: TurnTrace) -> bool:
    return record.preset is not None or _text(record.model).startswith("moa:")


def _main_call(calls: Sequence[CallRecord]) -> CallRecord | None:
    """The call whose output the caller received: the (last) aggregator."""
    aggregators = [call for call in calls if call.role == "aggregator" and isinstance(call.usage, CallUsage)]
    return aggregators[-1] if aggregators else None


def _request_model(call: CallRecord) -> str:
    # A direct call's label is the model the caller asked for. A MoA call records only the model the
    # response named (the requested one when it named none), so that is the best we have.
    if call.role == "direct" and _text(call.label):
        return _text(call.label)
    return _text(call.usage.model) or _text(call.model)


def _has_response(call: CallRecord) -> bool:
    """Whether the upstream answered with chat data (so the recorded model is the response's)."""
    return call.output_source != "none" or call.usage.usage_source == "reported"


def _streamed(call: CallRecord) -> bool | None:
    source = call.output_source
    if source in ("inline_from_stream", "partial_stream"):
        return True
    if source == "inline":
        return False
    return True if _seconds(call.usage.ttft_s) is not None else None


def _conversation(session_id: object) -> str | None:
    # A session the caller named is a conversation; the per-process default is not one.
    text = _text(session_id)
    return text if text and text != _process_default else None


def _description(usage: CallUsage) -> str | None:
    error = _text(usage.error)
    return error[:500] if error else None


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, Iterable) and not isinstance(value, str | bytes) else []


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _seconds(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _total(values: Iterable[object]) -> int | None:
    total = 0
    for value in values:
        count = _count(value)
        if count is None:
            return None
        total += count
    return total


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _money(value: object) -> float | None:
    return _seconds(value)


def _interval(started_at: object, duration_s: object) -> tuple[int | None, int | None]:
    """Start and end in ns since the epoch; None (the SDK's "now") for what is unknown."""
    if not (isinstance(started_at, int | float) and not isinstance(started_at, bool) and math.isfinite(started_at)):
        return None, None
    if started_at <= 0:
        return None, None
    start = int(started_at * 1e9)
    duration = _seconds(duration_s)
    return start, (start + int(duration * 1e9) if duration is not None else None)


def _put(attributes: dict[str, AttributeValue], key: str, value: AttributeValue | None) -> None:
    if value is None or value == "":
        return
    attributes[key] = value
