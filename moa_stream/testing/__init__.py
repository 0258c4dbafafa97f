"""The embedded simulator: an OpenAI-compatible upstream for demos, tests and benchmarks, yours too.

Like `httpx.MockTransport`, it is the test double users need: `sim_client()` is an
`openai.AsyncOpenAI` answered in-process (no sockets), `SimServer` serves the same simulator over real
HTTP on loopback (`moa-stream sim` from the command line). It serves chat completions and the
Responses API (`/responses`: create, streamed or not, `previous_response_id`, background responses to
retrieve, resume or cancel), each as OpenAI puts it on the wire. Output is deterministic per request;
each `SimModel` has its own latency profile and may inject a `Fault` (also per request, with the
`x-sim-fault: <kind>[;after=N][;stall=S]` header).
"""

from __future__ import annotations

from ._models import Fault, FaultKind, SimDisconnect, SimModel, SimResponse, SimStats, SimTimeout, sim_token_count
from ._server import SimServer, serve_forever
from ._simulator import Simulator, default_simulator
from ._transport import SimTransport, sim_client

__all__ = [
    "Fault",
    "FaultKind",
    "SimDisconnect",
    "SimModel",
    "SimResponse",
    "SimServer",
    "SimStats",
    "SimTimeout",
    "SimTransport",
    "Simulator",
    "default_simulator",
    "serve_forever",
    "sim_client",
    "sim_token_count",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or (callable(_obj) and hasattr(_obj, "__code__")):
        _obj.__module__ = __name__  # tracebacks and reprs name the public module
