"""moa_stream: Mixture-of-Agents streaming middleware for OpenAI-compatible chat-completion clients.

`wrap()` an `openai.AsyncOpenAI` and keep using it as before: every chat call is metered at the
HTTP transport and reported as events and per-turn trace records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._budget import Budget, BudgetExceeded, Limits, load_budget
from ._config import ConfigError, Preset, SelfMoA, Slot, load_config, self_moa, validate_presets
from ._dispatch import Sink, SinkStats
from ._events import (
    Aggregating,
    BudgetWarning,
    CallOutput,
    CallRecord,
    CallStatus,
    CallUsage,
    Event,
    OutputSource,
    ReferenceDone,
    ReferenceStarted,
    Role,
    ToolCall,
    TurnEnd,
    TurnTrace,
    UsageSource,
    event_decoder,
    event_encoder,
)
from ._ledger import SessionLedger, SessionState, SessionStateError, Totals
from ._meter import Engine
from ._moa import MOA_PREFIX
from ._pricing import ModelPrice, PriceTable
from ._session import SESSION_HEADER, current_session, sanitize_session_id, session
from ._traces import read_traces
from ._wrap import engine_of, flush, session_ledger, session_state, wrap

__all__ = [
    "Aggregating",
    "Budget",
    "BudgetExceeded",
    "BudgetWarning",
    "CallOutput",
    "CallRecord",
    "CallStatus",
    "CallUsage",
    "ConfigError",
    "Engine",
    "Event",
    "Limits",
    "MOA_PREFIX",
    "ModelPrice",
    "OTelSink",
    "OutputSource",
    "Preset",
    "PriceTable",
    "ReferenceDone",
    "ReferenceStarted",
    "Role",
    "SESSION_HEADER",
    "SelfMoA",
    "SessionLedger",
    "SessionState",
    "SessionStateError",
    "Sink",
    "SinkStats",
    "Slot",
    "ToolCall",
    "Totals",
    "TurnEnd",
    "TurnTrace",
    "UsageSource",
    "current_session",
    "engine_of",
    "event_decoder",
    "event_encoder",
    "flush",
    "load_budget",
    "load_config",
    "read_traces",
    "sanitize_session_id",
    "self_moa",
    "session",
    "session_ledger",
    "session_state",
    "validate_presets",
    "wrap",
]

if TYPE_CHECKING:
    from ._otel import OTelSink


def __getattr__(name: str) -> Any:
    # OTelSink needs the optional `otel` extra: import it only when asked for.
    if name == "OTelSink":
        from ._otel import OTelSink

        return OTelSink
    raise AttributeError(f"module 'moa_stream' has no attribute {name!r}")
