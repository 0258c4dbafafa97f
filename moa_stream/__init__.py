"""moa_stream: Mixture-of-Agents streaming middleware for OpenAI-compatible clients.

`wrap()` an `openai.AsyncOpenAI` and keep using it as before: every chat call is metered at the
HTTP transport and reported as events and per-turn trace records, and `model="moa:<name>"` runs a
Mixture-of-Agents preset. The embedded simulator, a test double for users too, is `moa_stream.testing`.
"""

from __future__ import annotations

import types as _types
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._budget import Budget, BudgetExceeded, Limits
from ._config import load_budget, load_config
from ._dispatch import Sink, SinkStats
from ._errors import ConfigError
from ._events import (
    Aggregating,
    BudgetShort,
    BudgetWarning,
    CallOutput,
    CallRecord,
    CallStatus,
    CallUsage,
    Event,
    MoaDecision,
    OutputSource,
    ReferenceDone,
    ReferenceStarted,
    Role,
    ToolCall,
    TraceContext,
    TurnEnd,
    TurnTrace,
    UsageSource,
    event_decoder,
    event_encoder,
)
from ._ledger import SessionStateError
from ._moa import MOA_PREFIX
from ._presets import Preset, SelfMoA, Slot, self_moa, validate_presets
from ._pricing import ModelPrice, PriceTable
from ._print import print_events
from ._session import SESSION_HEADER, current_session, sanitize_session_id, session
from ._sidecar import SessionLedger
from ._store import SessionState, StoreConfig
from ._totals import Totals
from ._traces import read_traces
from ._version import __version__
from ._wrap import add_sink, flush, session_ledger, session_state, set_session_budget, sink_stats, wrap

__all__ = [
    "Aggregating",
    "Budget",
    "BudgetExceeded",
    "BudgetShort",
    "BudgetWarning",
    "CallOutput",
    "CallRecord",
    "CallStatus",
    "CallUsage",
    "ConfigError",
    "Event",
    "Limits",
    "MOA_PREFIX",
    "MoaDecision",
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
    "StoreConfig",
    "ToolCall",
    "Totals",
    "TraceContext",
    "TurnEnd",
    "TurnTrace",
    "UsageSource",
    "__version__",
    "add_sink",
    "current_session",
    "event_decoder",
    "event_encoder",
    "flush",
    "load_budget",
    "load_config",
    "print_events",
    "read_traces",
    "sanitize_session_id",
    "self_moa",
    "session",
    "session_ledger",
    "session_state",
    "set_session_budget",
    "sink_stats",
    "validate_presets",
    "wrap",
]

if _TYPE_CHECKING:
    from ._otel import OTelSink


def _public(obj: _Any) -> None:
    # Tracebacks and reprs name the public module, not the private one a name is defined in.
    if isinstance(obj, type | _types.FunctionType):
        obj.__module__ = __name__


for _name in __all__:
    if _name in globals():
        _public(globals()[_name])


def __getattr__(name: str) -> _Any:
    # OTelSink needs the optional `otel` extra: import it only when asked for.
    if name == "OTelSink":
        from ._otel import OTelSink

        _public(OTelSink)
        return OTelSink
    raise AttributeError(f"module 'moa_stream' has no attribute {name!r}")
