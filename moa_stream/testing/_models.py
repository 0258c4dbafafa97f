"""What the simulator is made of: its models, the faults it injects, and what it answers with."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator
from typing import Final, Literal, cast, get_args

import msgspec

FaultKind = Literal[
    "http_429",
    "http_500",
    "disconnect",
    "stall",
    "malformed",
    "stream_error",
    "reject_stream_options",
    "no_usage",
    "usage_unasked",
    "invalid_utf8",
    "echo_key",
]
_FAULT_KINDS: Final[frozenset[str]] = frozenset(get_args(FaultKind))
_MID_STREAM_FAULTS: Final = frozenset({"disconnect", "stall", "malformed", "stream_error", "invalid_utf8"})


_SEEN = 1000


class Fault(msgspec.Struct, frozen=True, kw_only=True):
    """A failure the simulator injects: into every request for a model (`SimModel.fault`) or into
    one request (header `x-sim-fault: <kind>[;after=N][;stall=S]`, or `none` to switch it off), on
    chat completions and Responses create requests alike.

    Kinds: `http_429`/`http_500` answer with that status before any byte; after `after_chunks`
    SSE events, `disconnect` drops the connection, `stall` goes silent for `stall_s`, `malformed`
    sends one event that is not JSON and carries on, `stream_error` sends an in-stream error event
    and ends without [DONE] (Responses: an `error` event, and no terminal event), `invalid_utf8`
    sends the next event together with one whose text holds half a multibyte character, in one
    read, and ends; `reject_stream_options` is a 400 for chat requests carrying `stream_options`;
    `no_usage` never reports usage (like the llama.cpp server; Responses say `usage: null`);
    `usage_unasked` reports it whether asked or not (like vLLM with `--enable-force-include-usage`:
    a usage chunk always, no `usage` key on the others); `echo_key` is a 401 whose message echoes
    the request's credentials (as some gateways do). Non-streamed requests: a stall delays the
    reply, disconnect drops it, malformed and invalid_utf8 garble it. Responses have no usage to
    ask for, so `reject_stream_options` and `usage_unasked` change nothing there.
    """

    kind: FaultKind
    """What goes wrong (see above)."""
    after_chunks: int = 0
    """For disconnect/stall/malformed/stream_error/invalid_utf8: how many SSE events are sent first."""
    stall_s: float = 3600.0
    """For stall: how long the stream goes silent."""

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"Fault.kind must be one of {sorted(_FAULT_KINDS)}, got {self.kind!r}")
        if self.after_chunks < 0:
            raise ValueError(f"Fault.after_chunks must be >= 0, got {self.after_chunks!r}")
        if not self.stall_s >= 0:
            raise ValueError(f"Fault.stall_s must be >= 0, got {self.stall_s!r}")


class SimModel(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated model: its latency profile, reply length and optional fault."""

    name: str
    """The model name clients request."""
    ttft_s: float = 0.0
    """Delay before the first chunk (Responses: before the first delta; non-streamed: before the reply)."""
    tokens_per_s: float = 0.0
    """Generation speed; 0 means no delay between tokens."""
    jitter: float = 0.0
    """Sigma of a lognormal multiplier on `ttft_s`, seeded from the request (so reproducible)."""
    reply_tokens: int = 24
    """Reply length in words when the request sets no max_tokens/max_completion_tokens below it."""
    reasoning_tokens: int = 0
    """Words of `reasoning_content` (Responses: a reasoning summary) before the content, counted in usage."""
    fault: Fault | None = None
    """Injected into every request for this model unless the request's `x-sim-fault` overrides it."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("SimModel.name must be a non-empty string")
        for field in ("ttft_s", "tokens_per_s", "jitter"):
            value = getattr(self, field)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"SimModel.{field} must be a finite number >= 0, got {value!r}")
        if self.reply_tokens < 1:
            raise ValueError(f"SimModel.reply_tokens must be >= 1, got {self.reply_tokens!r}")
        if self.reasoning_tokens < 0:
            raise ValueError(f"SimModel.reasoning_tokens must be >= 0, got {self.reasoning_tokens!r}")


class SimResponse(msgspec.Struct, frozen=True, kw_only=True):
    """What `Simulator.handle` returns: a status and headers known up front, then the body."""

    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    """One item per SSE event, or the whole JSON document as a single item."""


@dataclasses.dataclass(slots=True)
class SimStats:
    """Counters for tests: what reached the simulator and what is still streaming."""

    requests: int = 0
    """Every call to `handle`, whatever the route or outcome."""
    open_streams: int = 0
    """Response bodies started and not yet finished or closed."""
    max_open_streams: int = 0
    """The most response bodies that were open at once."""
    requests_by_model: dict[str, int] = dataclasses.field(default_factory=dict)
    """Chat-completion and Responses create requests per requested model name."""
    rejected_stream_options: int = 0
    """Requests answered 400 by the `reject_stream_options` fault."""


class SimDisconnect(Exception):
    """Raised by a body iterator to make the transport drop the connection mid-body."""


class SimTimeout(Exception):
    """Raised by `handle` or a body iterator when the next byte would come later than the caller's
    `read_timeout`, after waiting that long: the in-process stand-in for a socket read timeout."""


def sim_token_count(text: str) -> int:
    """The simulator's tokenizer: the number of whitespace-separated words in `text`."""
    return len(text.split())


def parse_fault(value: str) -> Fault | None:
    """`<kind>[;after=N][;stall=S]`, or `none` to switch off the model's own fault."""
    kind, *options = (part.strip() for part in value.split(";"))
    if kind == "none":
        return None
    if kind not in _FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}")
    after, stall = 0, 3600.0
    for option in options:
        key, _, raw = option.partition("=")
        if key == "after":
            after = int(raw)
        elif key == "stall":
            stall = float(raw)
        else:
            raise ValueError(f"unknown option {option!r}")
    return Fault(kind=cast(FaultKind, kind), after_chunks=after, stall_s=stall)
