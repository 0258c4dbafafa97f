"""Events and trace records: what moa_stream reports about every upstream call and every turn.

They are frozen msgspec Structs tagged by a `type` field, so a JSONL stream of them decodes back into
the right classes with one `msgspec.json.Decoder(Event)`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Role = Literal["direct", "reference", "aggregator"]
"""Why a call was made: a caller's own call, a MoA reference, or a MoA aggregator."""

CallStatus = Literal["completed", "closed_early", "cancelled", "error"]
"""How a call ended: the upstream finished its answer; the caller closed or abandoned the stream
before that; the caller's task was cancelled; or an HTTP, connection or stream error."""

UsageSource = Literal["reported", "estimated", "missing"]
"""Where token counts come from: the upstream's usage data, our estimate from the text (the
upstream sent none), or nowhere (the call failed before any output; the counts are None)."""

Api = Literal["chat", "responses"]
"""The upstream API a call spoke: chat completions, or the Responses API."""

OutputSource = Literal["inline", "inline_from_stream", "partial_stream", "none"]
"""Where a call's recorded output came from: a non-streamed body, a stream read to its end, a stream
that ended early, or nothing (no output was received)."""


class _Record(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    pass


class CallUsage(_Record, tag="call_usage", tag_field="type", kw_only=True, frozen=True):
    """One upstream call's usage, cost and timing, emitted exactly once when the call ends."""

    call_id: str
    """Unique id of this upstream call."""
    turn_id: str
    """The turn this call belongs to (a direct call is a turn of its own)."""
    session_id: str
    """Session the turn belongs to (see `moa_stream.session`)."""
    role: Role
    """`direct`, `reference` or `aggregator`."""
    label: str
    """Human-readable name of the call: the slot label for MoA calls, the model for direct ones."""
    model: str
    """Model as reported by the response (the requested model when the response named none)."""
    provider: str
    """Host of the upstream's base URL, e.g. `api.openai.com`."""
    request_id: str | None = None
    """The upstream's `x-request-id` response header."""
    input_tokens: int | None = None
    """Prompt tokens, cached ones included."""
    cached_input_tokens: int | None = None
    """Prompt tokens served from the provider's prompt cache."""
    cache_write_tokens: int | None = None
    """Prompt tokens written to the provider's prompt cache (providers that bill cache writes)."""
    output_tokens: int | None = None
    """Completion tokens, reasoning tokens included."""
    reasoning_tokens: int | None = None
    """Completion tokens spent on hidden reasoning."""
    usage_source: UsageSource = "missing"
    """`reported`, `estimated` or `missing`; see `UsageSource`."""
    tool_calls: int = 0
    """Tool calls in the call's answer."""
    cost_usd: float | None = None
    """Cost in USD from the price table; None when the model's price is unknown (never 0 for that)."""
    started_at: float
    """Unix time at which the request was sent."""
    ttft_s: float | None = None
    """Seconds from sending the request to the first output token (streams only)."""
    duration_s: float
    """Seconds from sending the request to the end of the call."""
    finish_reason: str | None = None
    """The upstream's finish_reason of the first choice (`stop`, `length`, `tool_calls`...)."""
    status: CallStatus
    """How the call ended; see `CallStatus`."""
    error: str | None = None
    """What went wrong, for status `error` (HTTP status and message, exception, stream error)."""
    http_status: int | None = None
    """HTTP status code of the upstream response (None when no response arrived)."""
    api: Api = "chat"
    """`chat` (chat completions) or `responses` (the Responses API)."""


class TurnEnd(_Record, tag="turn_end", tag_field="type", kw_only=True, frozen=True):
    """One turn's totals, emitted once after every call of the turn has ended."""

    turn_id: str
    """Unique id of the turn."""
    session_id: str
    """Session the turn belongs to."""
    model: str
    """What the caller asked for: a model name, or `moa:<preset>`."""
    calls: int
    """Number of upstream calls made in the turn."""
    failed_calls: int
    """Calls that ended with status `error`."""
    input_tokens: int
    """Sum of input tokens over the calls whose usage is known."""
    cached_input_tokens: int
    """Sum of cached input tokens."""
    cache_write_tokens: int = 0
    """Sum of input tokens written to the provider's prompt cache (Anthropic-style cache writes)."""
    output_tokens: int
    """Sum of output tokens (reasoning included)."""
    reasoning_tokens: int
    """Sum of reasoning tokens."""
    usage_complete: bool
    """False when some call's usage is `missing`, so the sums are lower bounds."""
    cost_usd: float
    """Sum of the calls' known costs."""
    cost_complete: bool
    """False when some call's cost is unknown, so `cost_usd` is a lower bound."""
    tool_calls: int = 0
    """Tool calls the acting model (the call whose output the caller received) requested."""
    tool_names: list[str] = []
    """Their function names, in order."""
    started_at: float
    """Unix time at which the turn started."""
    ttft_s: float | None = None
    """Seconds from the start of the turn to the first output token the caller received."""
    duration_s: float
    """Seconds from the start of the turn to its end."""
    status: CallStatus
    """Status of the call whose output the caller received (`error` when a budget refused it)."""
    error: str | None = None
    """Why the turn failed before its answer could be asked for (a budget limit refused it)."""


class ToolCall(_Record, kw_only=True, frozen=True):
    """A tool call assembled from its streamed fragments."""

    index: int = 0
    """Position of the call in the model's list of tool calls."""
    id: str | None = None
    """The provider's tool-call id, which the tool result must quote."""
    name: str | None = None
    """Name of the function called."""
    arguments: str = ""
    """The arguments as the model wrote them: a JSON string, not validated."""


class CallOutput(_Record, kw_only=True, frozen=True):
    """What a model said in one call (the first choice)."""

    text: str = ""
    """The content text."""
    reasoning: str = ""
    """Reasoning text, where the server sends it (`reasoning_content` or `reasoning`)."""
    refusal: str = ""
    """A refusal message, where the model sent one."""
    tool_calls: list[ToolCall] = []
    """Tool calls, ordered by index."""

    def texts(self) -> list[str]:
        """Every piece of text it holds: content, reasoning, refusal and tool arguments."""
        return [self.text, self.reasoning, self.refusal, *(t.arguments for t in self.tool_calls)]


class CallRecord(_Record, kw_only=True, frozen=True):
    """One call inside a trace record: what the model saw and said, and how the call went."""

    call_id: str
    """Same as `usage.call_id`."""
    role: Role
    """`direct`, `reference` or `aggregator`."""
    label: str
    """The call's label (slot label, or the model for direct calls)."""
    model: str
    """Model as reported by the response."""
    provider: str
    """Host of the upstream's base URL."""
    input_messages: list[Any]
    """The messages exactly as sent upstream."""
    output: CallOutput
    """What the model said (first choice)."""
    output_source: OutputSource
    """`inline`, `inline_from_stream`, `partial_stream` or `none`; see `OutputSource`."""
    finish_reason: str | None = None
    """The upstream's finish_reason, if it sent one (for the Responses API: the response's final
    status, or the reason it is incomplete, such as `max_output_tokens`)."""
    usage: CallUsage
    """The call's usage event (tokens, cost, timing, status, error)."""
    api: Api = "chat"
    """`chat`, or `responses`: then `input_messages` holds the `input` items as sent (a string input
    as one user message), and the fields below the rest of the request."""
    instructions: str | None = None
    """Responses API: the `instructions` sent."""
    tools: list[Any] = []
    """Responses API: the tools offered."""
    previous_response_id: str | None = None
    """Responses API: the response this one continues (a conversation chain across trace lines)."""
    response_id: str | None = None
    """Responses API: the id of the response (what a later call's `previous_response_id` names)."""


class ReferenceStarted(_Record, tag="reference_started", tag_field="type", kw_only=True, frozen=True):
    """A MoA reference call was sent."""

    turn_id: str
    session_id: str
    preset: str
    """The preset's name (without `moa:`)."""
    layer: int
    """1-based layer number."""
    label: str
    """The reference slot's label."""
    model: str
    """The model requested for it."""
    total: int
    """References in this layer."""


class ReferenceDone(_Record, tag="reference_done", tag_field="type", kw_only=True, frozen=True):
    """A MoA reference call ended; `done` of `total` in its layer have ended so far."""

    turn_id: str
    session_id: str
    preset: str
    layer: int
    label: str
    status: CallStatus
    """How the reference ended (`cancelled` for a straggler stopped after the quorum's grace)."""
    done: int
    total: int


class Aggregating(_Record, tag="aggregating", tag_field="type", kw_only=True, frozen=True):
    """The aggregator request is being sent."""

    turn_id: str
    session_id: str
    preset: str
    model: str
    """The aggregator's model."""
    references_used: int
    """References whose answers the aggregator gets."""
    references_total: int
    """References in the last layer."""
    cadence: Literal["hit", "miss"]
    """`hit` when the references were reused from an earlier call of the same user turn."""


class TraceContext(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The caller's span when the turn started (W3C Trace Context), which the turn's spans join."""

    traceparent: str
    """`00-<trace id>-<span id>-<flags>`."""
    tracestate: str | None = None


class BudgetShort(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A MoA layer the budget could not hold in full (see `Preset.on_budget_short`)."""

    policy: str
    """`fewer_references`, `aggregator_alone` or `refuse`."""
    layer: int
    left_out: list[str]
    """Labels of the references that did not run for the budget."""
    limit: str
    """The limit that was short, as `<scope>.<limit>`."""


MoaDecisionKind = Literal["quorum_met", "reference_cancelled", "reference_unusable", "budget_refused", "budget_short"]
"""What the MoA engine decided: the quorum was met; the quorum-and-grace rule cancelled a
straggler; a reference completed without text, so the aggregator does not get it; the budget
refused a call (the turn, a reference or the aggregator); the budget held a layer short."""


class MoaDecision(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One decision taken during a MoA turn, when it was taken (see `TurnTrace.moa_events`)."""

    kind: MoaDecisionKind
    at: float
    """Unix time of the decision."""
    layer: int | None = None
    """1-based layer number (None for the aggregator)."""
    label: str | None = None
    """The reference (or aggregator) slot it is about, if one."""
    succeeded: int | None = None
    """`quorum_met`: references of the layer that had succeeded when the rule moved on (the quorum,
    and those that finished within the grace)."""
    total: int | None = None
    """`quorum_met`: references in the layer."""
    quorum: int | None = None
    """`quorum_met`: successes the rule waited for."""
    limit: str | None = None
    """`budget_refused`, `budget_short`: the limit, as `<scope>.<limit>` (what refused, for a refusal
    that was not a budget limit, such as an unreachable store)."""


class TurnTrace(_Record, tag="turn_trace", tag_field="type", kw_only=True, frozen=True):
    """One record per turn, appended to `<trace_dir>/<session_id>.jsonl`."""

    turn_id: str
    """Unique id of the turn (also in every `CallUsage` of it)."""
    session_id: str
    """Session the turn belongs to; names the trace file."""
    model: str
    """What the caller asked for: a model name, or `moa:<preset>`."""
    calls: list[CallRecord]
    """Every upstream call of the turn, in the order they started."""
    end: TurnEnd
    """The turn's totals."""
    preset: str | None = None
    """For a MoA turn, the preset's name."""
    cadence: Literal["hit", "miss"] | None = None
    """For a MoA turn: whether the references were reused (`hit`) or run (`miss`)."""
    aggregator_wait_s: float | None = None
    """For a MoA turn: seconds from the moment the fan-out rule allowed the aggregator to start
    (quorum and grace, or every reference done) to the aggregator request being sent."""
    budget_short: list[BudgetShort] = []
    """For a MoA turn: the layers whose references the budget could not all hold, and what ran."""
    parent: TraceContext | None = None
    """The caller's current span when the turn started, when OpenTelemetry is in use (see `OTelSink`
    and `wrap(propagate_trace=)`): the turn's spans are its children."""
    moa_events: list[MoaDecision] = []
    """For a MoA turn: its fan-out and budget decisions, in order (`OTelSink` makes them span
    events). A reference that timed out is not among them: its call's error says so."""


class BudgetWarning(_Record, tag="budget_warning", tag_field="type", kw_only=True, frozen=True):
    """A soft budget limit was crossed, or a cost limit cannot be enforced exactly; once each."""

    session_id: str
    turn_id: str
    """The turn whose call crossed the limit."""
    kind: Literal["soft_limit", "cost_unknown", "budget_short"]
    """`soft_limit`: spending reached a soft limit. `cost_unknown`: a call's price is unknown, so
    cost limits count it as zero (reported once per session). `budget_short`: a MoA layer ran with
    fewer references than its preset has (see `TurnTrace.budget_short`)."""
    scope: Literal["session", "turn", "key"]
    limit: str
    """Which limit: `cost_usd`, `input_tokens`, `output_tokens`, `total_tokens` or `calls`."""
    threshold: float
    spent: float
    """What the session or turn has used, in the limit's unit."""
    message: str


Event = CallUsage | TurnEnd | TurnTrace | ReferenceStarted | ReferenceDone | Aggregating | BudgetWarning
"""Everything a sink can receive."""

event_encoder = msgspec.json.Encoder()
event_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
