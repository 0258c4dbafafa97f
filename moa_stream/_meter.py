"""Turns and calls: the bookkeeping that turns upstream exchanges into exactly-once events.

A turn is one request of the caller; a call is one upstream HTTP exchange of it. Both report to
their owner (the engine), which admits calls against budgets, keeps the ledger and delivers events;
`Owner` is what they need of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import msgspec

from ._budget import BudgetBreach, BudgetPolicy
from ._buffer import CallBuffer
from ._errors import ClientClosedError, Refusal
from ._events import CallRecord, CallStatus, CallUsage, Role, TraceContext, TurnEnd, TurnTrace
from ._facts import MoaFacts, ResponsesRequest
from ._holds import Hold
from ._ids import new_id
from ._outcome import interruption, output_source, turn_end, turn_outcome
from ._pricing import PriceTable
from ._redact import Redactor, redact_trace, scrub, secret_redactor
from ._totals import Totals
from ._turn_holds import TurnHolds
from ._usage import resolve_tokens


class Owner(Protocol):
    """What turns and calls need of the engine that owns them."""

    prices: PriceTable
    redactor: Redactor | None

    @property
    def is_open(self) -> bool: ...

    async def reserve(self, turn: Turn, holds: list[Hold]) -> tuple[list[Hold], BudgetBreach | None]:
        """Admit what fits of `holds` (see `_holds.admit_group`), or raise `StoreUnavailable`."""

    def release(self, turn: Turn, call_ids: list[str]) -> None:
        """Give back the holds of calls that will not start."""

    def call_started(self, call: Call) -> None: ...

    def call_ended(self, call: Call, usage: CallUsage, turn: tuple[Totals, Totals]) -> None:
        """Record and report a call that has ended; `turn` is the turn's totals before and after."""

    def turn_ended(self, turn: Turn, end: TurnEnd, trace: TurnTrace) -> None:
        """Record and report a turn that has ended."""

    def finish_later(self, work: Coroutine[Any, Any, None], *, fallback: Callable[[], None]) -> bool:
        """Run bounded `work` off the caller's path, or say it cannot (see `Engine.finish_later`)."""

    def hold_background(self, call: Call) -> None:
        """Keep `call` open until its background response's final status is seen."""

    def end_abandoned(self, call: Call) -> None:
        """End `call` as `closed_early` for a finalizer (see `Engine.end_abandoned`)."""


class Turn:
    """A caller's request: one or more upstream calls, closed by one `TurnEnd` and one `TurnTrace`.

    The turn ends when it is sealed (no more calls will start) and its last call has ended. Its
    `policy` is its session's budget (its own, or the client's); `key_id` the API key whose limits
    apply too (`serve --keys`); `weighs` whether holds weigh tokens and cost, or only count calls;
    `parent` the caller's trace context (OpenTelemetry), which its spans and upstreams join.
    """

    def __init__(
        self,
        owner: Owner,
        *,
        session_id: str,
        model: str,
        key_id: str | None = None,
        policy: BudgetPolicy | None = None,
        weighs: bool = False,
        parent: TraceContext | None = None,
    ) -> None:
        self.owner = owner
        self.turn_id = new_id()
        self.session_id = session_id
        self.key_id = key_id
        self.policy = policy
        self.weighs = weighs
        self.parent = parent
        self.upstream_headers: dict[str, str] = {}  # the trace context, when it goes upstream
        self.holds = TurnHolds()
        self.model = model
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._open = 0
        self._sealed = False
        self._ended = False
        self._records: list[CallRecord] = []
        self._totals = Totals()
        self._main: Call | None = None
        self._main_usage: CallUsage | None = None
        """The main call's usage, kept once it ended: holding the call would keep a reference cycle
        (call -> turn -> call) that only the garbage collector could free, for every call."""
        self.refused: Refusal | None = None
        """What refused one of the turn's calls (a budget limit, the store), if any."""
        self._error: str | None = None
        self._cut = False
        self._secrets: set[str] = set()
        self._secret_seen = False
        self._moa: MoaFacts | None = None

    def settled(self) -> Totals:
        """What the turn's ended calls used."""
        with self._lock:
            return self._totals

    def calls_so_far(self) -> list[CallUsage]:
        """Usage of the calls that have ended so far."""
        with self._lock:
            return [record.usage for record in self._records]

    async def new_call(
        self,
        *,
        role: Role,
        label: str,
        provider: str,
        model: str,
        input_messages: list[Any],
        streamed: bool,
        main: bool = False,
        secrets: tuple[str, ...] = (),
        responses: ResponsesRequest | None = None,
        max_output_tokens: int | None = None,
        hold: Hold | None = None,
    ) -> Call:
        """Start a call; `main` marks the one whose output the caller receives; `secrets` are the
        credential values its request carries, kept out of every event and trace; `responses`
        makes it a Responses API call. `hold` is one the turn reserved ahead; without it, the
        call's worst case is reserved now. Raises `Refusal` (a budget limit, an unreachable store)
        and starts nothing, or `ClientClosedError` once the client is closed."""
        if self._sealed:
            raise RuntimeError("a sealed turn cannot start calls")
        if not self.owner.is_open:
            raise ClientClosedError("moa_stream: the client is closed")
        if hold is None or not self.holds.planned(hold):
            try:
                hold = await self.holds.admit(self, model, input_messages, max_output_tokens)
            except Refusal as refused:
                self.refused = self.refused or refused
                raise
        self.holds.started(hold)
        call = Call(
            self,
            call_id=hold.call_id,
            role=role,
            label=label,
            provider=provider,
            model=model,
            input_messages=input_messages,
            streamed=streamed,
            secrets=secrets,
            responses=responses,
        )
        with self._lock:
            self._open += 1
            if main:
                self._main = call
            self._secrets.update(secrets)
        self.owner.call_started(call)
        return call

    def fail(self, reason: str) -> None:
        """Why the turn failed, when it was not one call's failure (a refusal, a bad request)."""
        self._error = self._error or reason

    def note_inputs(self, body: bytes, secrets: tuple[str, ...]) -> None:
        """Record whether the caller's own request body holds one of `secrets` (a pasted key):
        then the trace's messages are scrubbed too."""
        if any(secret.encode() in body for secret in secrets):
            with self._lock:
                self._secrets.update(secrets)
                self._secret_seen = True

    def cut_short(self) -> None:
        """End the turn now (its client is closing): no more calls start."""
        self._cut = True
        self.seal()

    @property
    def moa(self) -> MoaFacts | None:
        return self._moa

    def seal(self, moa: MoaFacts | None = None) -> None:
        """No more calls will start; the turn ends once its open calls have. A MoA turn gives its
        facts here, once."""
        if moa is not None and self._moa is None:
            self._moa = moa
        self.holds.release_planned(self)
        with self._lock:
            self._sealed = True
            end = self._open == 0 and not self._ended
            self._ended = self._ended or end
        if end:
            self._end()

    def _call_ended(self, call: Call, record: CallRecord) -> None:
        with self._lock:
            before = self._totals
            self._totals = after = before.plus(record.usage)
            self._records.append(record)
            if call is self._main:
                self._main, self._main_usage = None, record.usage
            self._open -= 1
            end = self._sealed and self._open == 0 and not self._ended
            self._ended = self._ended or end
        self.holds.ended(call.call_id)  # after the totals have it: counted twice for a moment, never zero times
        self.owner.call_ended(call, record.usage, (before, after))
        if end:
            self._end()

    def _end(self) -> None:
        records = sorted(self._records, key=lambda r: r.usage.started_at)
        usages = [r.usage for r in records]
        main = self._main_usage
        reason = self._error or (self.refused.message() if self.refused is not None else None)
        status, error = turn_outcome(main, usages, reason, cut=self._cut)
        if error is not None and self._secrets:
            error = scrub(error, self._secrets)
        end = turn_end(
            records,
            turn_id=self.turn_id,
            session_id=self.session_id,
            model=self.model,
            main=main,
            started_at=self.started_at,
            duration_s=time.perf_counter() - self._t0,
            status=status,
            error=error,
        )
        moa = self._moa
        trace = TurnTrace(
            turn_id=self.turn_id,
            session_id=self.session_id,
            model=self.model,
            calls=records,
            end=end,
            preset=None if moa is None else moa.preset,
            cadence=None if moa is None else moa.cadence,
            aggregator_wait_s=None if moa is None else moa.aggregator_wait_s,
            budget_short=[] if moa is None else moa.budget_short,
            moa_events=[] if moa is None else moa.moa_events,
            parent=self.parent,
        )
        if self._secret_seen:
            trace = redact_trace(trace, secret_redactor(self._secrets))
        redactor = self.owner.redactor
        self.owner.turn_ended(self, end, trace if redactor is None else redact_trace(trace, redactor))


_ENDING = threading.RLock()
"""Makes "not ended yet, so end it" one step: a second `end()` can come from another thread, or from
inside the first, when the collector runs a finalizer (a byte stream's `__del__` backstop) at one of
its allocations. Reentrant, so that such a finalizer finds the call ending and returns."""


class Call:
    """One upstream HTTP exchange. `end()` records it; only the first `end()` counts."""

    __slots__ = (
        "_ending",
        "_t0",
        "buffer",
        "call_id",
        "deadline",
        "held",
        "http_status",
        "input_messages",
        "label",
        "model",
        "provider",
        "request_id",
        "responses",
        "role",
        "secrets",
        "started_at",
        "streamed",
        "ttft_s",
        "turn",
        "usage",
    )

    def __init__(
        self,
        turn: Turn,
        *,
        call_id: str,
        role: Role,
        label: str,
        provider: str,
        model: str,
        input_messages: list[Any],
        streamed: bool,
        secrets: tuple[str, ...] = (),
        responses: ResponsesRequest | None = None,
    ) -> None:
        self.turn = turn
        self.call_id = call_id
        self.responses = responses
        self.role: Role = role
        self.label = label
        self.provider = provider
        self.model = model
        self.input_messages = input_messages
        self.streamed = streamed
        self.buffer = CallBuffer()
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        self.ttft_s: float | None = None
        self.http_status: int | None = None
        self.request_id: str | None = None
        self.usage: CallUsage | None = None
        self.deadline: tuple[float, float] | None = None
        """(anyio time, seconds): a cancellation at or after that time is this call's timeout."""
        self.secrets = secrets
        """Credential values its request carried: replaced in whatever it records."""
        self.held = False
        """A background response: its exchange is over, the call ends when its final status is seen."""
        self._ending = False

    @property
    def ended(self) -> bool:
        return self.usage is not None

    def hold(self) -> None:
        """The exchange is over but the response is not (a background response): keep the call
        open, for whichever later request sees its final status (see `_background`)."""
        if self.usage is None and not self.held:
            self.held = True
            self.turn.owner.hold_background(self)

    def first_output(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self._t0

    def interrupted(self, exc: BaseException) -> tuple[CallStatus, str | None]:
        """The status of a call that `exc` interrupted (see `_outcome.interruption`)."""
        return interruption(exc, self.deadline)

    def end(self, status: CallStatus, error: str | None = None) -> None:
        """Record how the call ended and emit its `CallUsage`. Synchronous, so cancellation can never
        interrupt it half-way; a second `end()` (another thread's, or a finalizer's that the
        collector runs inside this one) returns at once. A held call (see `hold`) ends only once it
        is released."""
        with _ENDING:
            if self._ending or self.held:
                return
            self._ending = True
        duration = time.perf_counter() - self._t0
        turn = self.turn
        buffer = self.buffer
        if status == "error" and error is None:
            error = buffer.error
        output = buffer.output()
        if self.secrets:
            if error is not None:
                error = scrub(error, self.secrets)
            if any(secret in text for secret in self.secrets for text in output.texts()):
                turn._secret_seen = True  # the trace's copy is scrubbed when the turn ends
        request = self.responses
        estimated_from = self.input_messages
        if request is not None and request.instructions:
            estimated_from = [{"role": "system", "content": request.instructions}, *estimated_from]
        tokens = resolve_tokens(
            buffer,
            estimated_from,
            got_response=self.http_status is not None and self.http_status < 400,
            streamed=self.streamed,
        )
        model = buffer.model or self.model
        prices = turn.owner.prices
        self.usage = usage = CallUsage(
            call_id=self.call_id,
            turn_id=turn.turn_id,
            session_id=turn.session_id,
            role=self.role,
            label=self.label,
            model=model,
            provider=self.provider,
            request_id=self.request_id,
            input_tokens=tokens.input,
            cached_input_tokens=tokens.cached_input,
            cache_write_tokens=tokens.cache_write,
            output_tokens=tokens.output,
            reasoning_tokens=tokens.reasoning,
            usage_source=tokens.source,
            tool_calls=len(output.tool_calls),
            cost_usd=prices.cost(
                model if prices.lookup(model) is not None else self.model,
                input_tokens=tokens.input,
                output_tokens=tokens.output,
                cached_input_tokens=tokens.cached_input,
                cache_write_tokens=tokens.cache_write,
                reasoning_tokens=tokens.reasoning,
            ),
            started_at=self.started_at,
            ttft_s=self.ttft_s,
            duration_s=duration,
            finish_reason=buffer.finish_reason,
            status=status,
            error=error,
            http_status=self.http_status,
            api="chat" if request is None else "responses",
        )
        record = CallRecord(
            call_id=usage.call_id,
            role=self.role,
            label=self.label,
            model=model,
            provider=self.provider,
            input_messages=self.input_messages,
            output=output,
            output_source=output_source(self.streamed, status, buffer.has_output()),
            finish_reason=buffer.finish_reason,
            usage=usage,
        )
        if request is not None:
            record = msgspec.structs.replace(
                record,
                api="responses",
                instructions=request.instructions,
                tools=request.tools,
                previous_response_id=request.previous_response_id or buffer.previous_response_id,
                response_id=buffer.response_id,
            )
        turn._call_ended(self, record)
