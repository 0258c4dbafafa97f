"""The caller's W3C trace context: read where a turn starts, so that its spans join the caller's
trace (they are built later, on the sink thread) and, if asked, so that upstreams join it too.

OpenTelemetry is an optional extra: without it, or without a recording span, there is no context.
"""

from __future__ import annotations

import functools
from types import ModuleType

from ._events import TraceContext


@functools.cache
def _trace_api() -> ModuleType | None:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


def current_trace_context() -> TraceContext | None:
    """The span current in the caller's context, as `traceparent`/`tracestate` header values."""
    trace = _trace_api()
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    state = context.trace_state.to_header() if context.trace_state else None
    return TraceContext(traceparent=parent, tracestate=state or None)


def trace_headers(context: TraceContext | None) -> dict[str, str]:
    """The headers that carry `context` upstream (W3C Trace Context)."""
    if context is None:
        return {}
    if context.tracestate is None:
        return {"traceparent": context.traceparent}
    return {"traceparent": context.traceparent, "tracestate": context.tracestate}
