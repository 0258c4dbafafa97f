"""What the OpenTelemetry sink reads from a trace record: the provider of a host, the class of an
error, and every field read defensively (a missing or ill-typed field means "leave it out")."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from opentelemetry.util.types import AttributeValue

from ._events import CallRecord, CallUsage, TurnTrace
from ._session import _process_default

# Hosts whose provider has a well-known `gen_ai.provider.name` value (the conventions say it MUST be
# used where it applies). Each serves HTTPS on its default port only.
_PROVIDERS: Final[Mapping[str, str]] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral_ai",
    "api.x.ai": "x_ai",
    "api.perplexity.ai": "perplexity",
    "api.cohere.com": "cohere",
    "api.cohere.ai": "cohere",
    "generativelanguage.googleapis.com": "gcp.gemini",
    "aiplatform.googleapis.com": "gcp.vertex_ai",
}
_PROVIDER_SUFFIXES: Final = (
    (".openai.azure.com", "azure.ai.openai"),
    (".cognitiveservices.azure.com", "azure.ai.openai"),
    ("-aiplatform.googleapis.com", "gcp.vertex_ai"),
)
_CLIENT_PROVIDER: Final = "openai"
"""Any other host (vLLM, llama.cpp, a gateway, the simulator) speaks the OpenAI API to the OpenAI
client library: the conventions' provider is the instrumentation's best knowledge and names the
telemetry flavour, so it is `openai`, and `server.address` tells the hosts apart."""
_HTTPS_PORT: Final = 443

_EXCEPTION_NAME: Final = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)(?::|$)")


def _well_known(host: str) -> str | None:
    host = host.lower().rstrip(".")
    if host in _PROVIDERS:
        return _PROVIDERS[host]
    for suffix, name in _PROVIDER_SUFFIXES:
        if host.endswith(suffix):
            return name
    return None


def provider_name(host: str) -> str:
    """`gen_ai.provider.name` for an upstream host: the conventions' well-known value, else `openai`."""
    return _well_known(host) or _CLIENT_PROVIDER


def server_port(host: str) -> int | None:
    """`server.port` where the host alone tells it: the well-known APIs serve HTTPS on 443 only."""
    return _HTTPS_PORT if _well_known(host) is not None else None


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


def is_moa(record: TurnTrace) -> bool:
    return record.preset is not None or text(record.model).startswith("moa:")


def main_call(calls: Sequence[CallRecord]) -> CallRecord | None:
    """The call whose output the caller received: the (last) aggregator."""
    aggregators = [call for call in calls if call.role == "aggregator" and isinstance(call.usage, CallUsage)]
    return aggregators[-1] if aggregators else None


def request_model(call: CallRecord) -> str:
    # A direct call's label is the model the caller asked for. A MoA call records only the model the
    # response named (the requested one when it named none), so that is the best we have.
    if call.role == "direct" and text(call.label):
        return text(call.label)
    return text(call.usage.model) or text(call.model)


def has_response(call: CallRecord) -> bool:
    """Whether the upstream answered with chat data (so the recorded model is the response's)."""
    return call.output_source != "none" or call.usage.usage_source == "reported"


def streamed(call: CallRecord) -> bool | None:
    source = call.output_source
    if source in ("inline_from_stream", "partial_stream"):
        return True
    if source == "inline":
        return False
    return True if seconds(call.usage.ttft_s) is not None else None


def conversation(session_id: object) -> str | None:
    # A session the caller named is a conversation; the per-process default is not one.
    value = text(session_id)
    return value if value and value != _process_default else None


def description(usage: CallUsage) -> str | None:
    error = text(usage.error)
    return error[:500] if error else None


def as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, Iterable) and not isinstance(value, str | bytes) else []


def text(value: object) -> str:
    return value if isinstance(value, str) else ""


def count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def seconds(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def total(values: Iterable[object]) -> int | None:
    """The sum, or None when any value is unknown (a lower bound would read as the total)."""
    result = 0
    for value in values:
        known = count(value)
        if known is None:
            return None
        result += known
    return result


def flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def money(value: object) -> float | None:
    return seconds(value)


def epoch_ns(at: object) -> int | None:
    """Unix time in seconds as ns since the epoch; None (the SDK's "now") when it is not one."""
    if not (isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at)) or at <= 0:
        return None
    return int(at * 1e9)


def interval(started_at: object, duration_s: object) -> tuple[int | None, int | None]:
    """Start and end in ns since the epoch; None (the SDK's "now") for what is unknown."""
    start = epoch_ns(started_at)
    if start is None:
        return None, None
    duration = seconds(duration_s)
    return start, (start + int(duration * 1e9) if duration is not None else None)


def put(attributes: dict[str, AttributeValue], key: str, value: AttributeValue | None) -> None:
    if value is None or value == "":
        return
    attributes[key] = value
