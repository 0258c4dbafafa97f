"""A Mixture-of-Agents turn: references fan out, the aggregator's response goes back to the caller.

The turn is several metered upstream calls plus one teed aggregator stream: references are read to
their end here (or cancelled), then the aggregator's response is returned to the caller's SDK as if
it had asked the aggregator directly, with the references' answers injected into its messages.
Every request ends one turn, a refused one too; the retry policy is `_retry`'s.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import anyio
import anyio.abc

from ._aggregator import AggregatorStep, slot_payload
from ._budget import BudgetBreach
from ._cadence import CachedReferences, user_turn_key
from ._engine import Engine
from ._errors import Refusal, error_response
from ._events import (
    BudgetShort,
    CallStatus,
    MoaDecision,
    MoaDecisionKind,
    ReferenceDone,
    ReferenceStarted,
    TraceContext,
)
from ._facts import MoaFacts, ResponsesRequest
from ._fanout import run_layer
from ._holds import Hold
from ._ledger import SessionStateError
from ._meter import Call, Turn
from ._moa_budget import budget_short, plan_layer, short_warning
from ._presets import Preset, Slot
from ._prompt import Reference, inject_references, reference_view
from ._responses_view import request_problem, to_messages
from ._slots import SlotError
from ._upstream import Upstream, send_chat, send_responses

MOA_PREFIX = "moa:"


async def run_moa_turn(
    engine: Engine,
    default: Upstream,
    payload: dict[str, Any],
    *,
    body: bytes,
    session_id: str,
    key_id: str | None = None,
    api: str = "chat",
    parent: TraceContext | None = None,
) -> Any:
    """Answer a `moa:<name>` request (chat completions, or `api="responses"`): the aggregator's
    response, teed, or an error response."""
    model = str(payload["model"])
    try:
        turn = engine.new_turn(session_id=session_id, model=model, key_id=key_id, parent=parent)
    except SessionStateError as exc:
        return exc.response(default.http)
    turn.note_inputs(body, default.secrets)
    name = model[len(MOA_PREFIX) :]
    preset = engine.presets.get(name)
    if preset is None:
        known = ", ".join(f"moa:{n}" for n in sorted(engine.presets)) or "none are configured"
        message = f"unknown MoA preset {model!r}; presets: {known}"
        return _refused(turn, default, 404, message, param="model", code="model_not_found")
    conversation: list[Any] | None = None
    unknown_previous: str | None = None
    if api == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return _refused(turn, default, 400, f"{model}: 'messages' must be a non-empty list", param="messages")
    else:
        problem = request_problem(payload)
        if problem is not None:
            return _refused(turn, default, 400, f"{model}: {problem[0]}", param=problem[1])
        previous = payload.get("previous_response_id")
        earlier = engine.transcripts.get(previous) if isinstance(previous, str) else None
        if earlier is None and isinstance(previous, str):
            unknown_previous = previous
        conversation = [*(earlier or []), *to_messages(None, payload["input"])]
        # Instructions apply to their own request only (the API does not carry them over a
        # previous_response_id), so they head this turn's messages and stay out of its transcript.
        messages = [*to_messages(payload.get("instructions"), []), *conversation]
    try:
        slots = [*(slot for layer in preset.reference_layers() for slot in layer), preset.aggregator_slot()]
        upstreams = {slot.label: engine.slots.upstream_for(slot, default) for slot in slots}
    except SlotError as exc:
        return _refused(turn, default, 500, f"{model}: {exc}")
    moa = MoaTurn(engine, turn, name, preset, default, payload, messages, upstreams, api=api)
    moa.conversation, moa.unknown_previous = conversation, unknown_previous
    if unknown_previous is not None and engine.quirks.lacks_responses(upstreams[preset.aggregator_slot().label].origin):
        return _refused(turn, default, 400, moa.unknown_previous_message(), param="previous_response_id")
    try:
        # Stragglers cancelled by the quorum rule wind down in this group while the aggregator's
        # request goes out; leaving it waits for them, after the response has arrived.
        async with anyio.create_task_group() as stragglers:
            return await moa.answer(stragglers)
    except BaseExceptionGroup as group:
        moa.seal()  # every call has ended; the turn still gets its TurnEnd and trace
        if len(group.exceptions) == 1:
            # The aggregator's own failure, unwrapped: the caller's SDK maps it as for any call.
            raise group.exceptions[0] from None
        raise
    except BaseException:
        moa.seal()
        raise


def _refused(
    turn: Turn, default: Upstream, status: int, message: str, *, param: str | None = None, code: str | None = None
) -> Any:
    """End a turn that could not give an answer; its error response says why, and so does its `TurnEnd`."""
    turn.fail(message)
    turn.seal()
    return error_response(default.http, status, message, param=param, code=code)


class MoaTurn(AggregatorStep):
    """One `moa:<name>` request being answered: its engine, preset, turn, upstreams and messages
    (chat messages, whatever the caller's API). The references are here, the aggregator is
    `_aggregator.AggregatorStep`'s."""

    def __init__(
        self,
        engine: Engine,
        turn: Turn,
        name: str,
        preset: Preset,
        default: Upstream,
        payload: dict[str, Any],
        messages: list[Any],
        upstreams: dict[str, Upstream],
        *,
        api: str = "chat",
    ) -> None:
        self.engine = engine
        self.api = api
        """The caller's API: `chat`, or `responses`."""
        self.turn = turn
        self.name = name
        self.model = f"{MOA_PREFIX}{name}"
        self.preset = preset
        self.default = default
        self.payload = payload
        self.messages = messages
        self.upstreams = upstreams
        self.cadence: Literal["hit", "miss"] | None = None
        self.aggregator_wait_s: float | None = None
        self.served_id: str | None = None
        """The response id given to the caller, when the answer was bridged from chat completions."""
        self.conversation: list[Any] | None = None
        """A Responses API turn's conversation without its instructions: what its transcript keeps."""
        self.unknown_previous: str | None = None
        """A `previous_response_id` with no transcript here (only the aggregator's upstream may hold it)."""
        self.aggregator_hold: Hold | None = None
        self.budget_short: list[BudgetShort] = []
        self.moa_events: list[MoaDecision] = []
        """The fan-out's and the budget's decisions, as they are taken (see `TurnTrace.moa_events`)."""
        self.refused_ahead: Refusal | None = None
        self.budgeted = turn.policy is not None or turn.key_id in engine.key_limits or engine.shared_store
        """Some limit may apply: layers reserve their holds ahead (see `_moa_budget`)."""

    def seal(self) -> None:
        """No more calls: the turn ends with what it did, and its MoA facts in the trace."""
        refused = self.turn.refused
        if refused is not None and not any(event.kind == "budget_refused" for event in self.moa_events):
            # Refused where no decision of ours was recorded: the aggregator's call (`_aggregator`).
            self.decided("budget_refused", limit=_refused_by(refused))
        facts = MoaFacts(
            preset=self.name,
            cadence=self.cadence,
            aggregator_wait_s=self.aggregator_wait_s,
            conversation=self.conversation,
            served_id=self.served_id,
            budget_short=self.budget_short,
            moa_events=list(self.moa_events),
        )
        self.turn.seal(facts)

    def decided(
        self, kind: MoaDecisionKind, *, layer: int | None = None, label: str | None = None, limit: str | None = None
    ) -> None:
        """Record a decision taken now."""
        self.moa_events.append(MoaDecision(kind=kind, at=time.time(), layer=layer, label=label, limit=limit))

    def refuse(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> Any:
        self.turn.fail(message)
        self.seal()
        return error_response(self.default.http, status, message, param=param, code=code)

    async def answer(self, stragglers: anyio.abc.TaskGroup) -> Any:
        references, missing, stale, allowed_at = await self._references(stragglers)
        if self.refused_ahead is not None:
            self.seal()  # the budget cannot pay for the aggregator: nothing ran, nothing will
            return self.refused_ahead.response(self.default.http)
        left_out_all = bool(self.budget_short) and not self.turn.calls_so_far()
        if not references and self.preset.on_all_failed == "error" and not left_out_all:
            if self.turn.refused is not None:  # the budget stopped the fan-out: that is the error to report
                self.seal()
                return self.turn.refused.response(self.default.http)
            failures = "; ".join(f"{u.label}: {u.error or _unusable(u.status)}" for u in self.turn.calls_so_far())
            return self.refuse(502, f"{self.model}: every reference failed ({failures})")
        return await self.aggregate(references, missing, stale, allowed_at)

    # -- references ----------------------------------------------------------------------------

    async def _references(self, stragglers: anyio.abc.TaskGroup) -> tuple[list[Reference], list[str], bool, float]:
        """The last layer's answers, the labels that failed, whether they predate newer tool results,
        and when the fan-out rule allowed the aggregator to start."""
        preset, turn = self.preset, self.turn
        cache = self.engine.caches[self.name]
        key = None if preset.cadence == "per_call" else user_turn_key(self.name, turn.session_id, self.messages)
        if key is not None:
            cached = await cache.get(key, every_n=preset.every_n if preset.cadence == "every_n" else None)
            # Only the next call of a tool loop (tool results appended to the cached user turn) reuses
            # them: the same request again (a "regenerate") gets fresh references.
            if cached is not None and (len(self.messages) > cached.transcript_length or preset.cache_repeats):
                self.cadence = "hit"
                stale = len(self.messages) > cached.transcript_length
                return list(cached.references), list(cached.missing), stale, time.perf_counter()
        self.cadence = "miss"
        references: list[Reference] = []
        missing: list[str] = []
        allowed_at = time.perf_counter()
        previous = 0
        for number, layer in enumerate(preset.reference_layers(), start=1):
            holds: dict[str, Hold] = {}
            left_out: list[str] = []
            if self.budgeted:
                first = number == 1
                plan = await plan_layer(turn, preset, layer, self.messages, self.payload, first=first, after=previous)
                if plan.refused is not None:
                    self.decided("budget_refused", layer=number, limit=_refused_by(plan.refused))
                    turn.refused = self.refused_ahead = turn.refused or plan.refused
                    return [], [], False, time.perf_counter()
                self.aggregator_hold = self.aggregator_hold or plan.aggregator
                holds, left_out = plan.holds, plan.left_out
                if left_out:
                    self.budget_short.append(short := budget_short(preset.on_budget_short, number, plan))
                    self.decided("budget_short", layer=number, limit=short.limit or None)
                    self.engine.emit(short_warning(turn, self.model, preset.on_budget_short, number, plan, len(layer)))
                    layer = [slot for slot in layer if slot.label in holds]
                    if not layer:  # nothing of this layer fits: the layer before it is the last one
                        return references, missing if number > 1 else left_out, False, time.perf_counter()
                previous = sum(hold.amounts.output_tokens for hold in holds.values())
            # A proposer of a later layer sees the previous layer's answers.
            calls, allowed_at = await self._layer(number, layer, references, missing, stragglers, holds)
            references, missing = [], list(left_out)
            for slot, call in zip(layer, calls, strict=True):
                if call is not None and _usable(call):
                    references.append(Reference(slot.label, call.buffer.text))
                else:
                    missing.append(slot.label)
        if key is not None and references:
            await cache.put(
                key, CachedReferences(references=references, missing=missing, transcript_length=len(self.messages))
            )
        return references, missing, False, allowed_at

    async def _layer(
        self,
        number: int,
        layer: list[Slot],
        previous: list[Reference],
        previous_missing: list[str],
        stragglers: anyio.abc.TaskGroup,
        holds: dict[str, Hold],
    ) -> tuple[list[Call | None], float]:
        """Run one layer's references; their calls in slot order, and when the quorum rule was met."""
        preset, turn = self.preset, self.turn
        calls: list[Call | None] = [None] * len(layer)
        done = 0

        def reference_done(label: str, status: CallStatus) -> None:
            nonlocal done
            done += 1
            self.engine.emit(
                ReferenceDone(
                    turn_id=turn.turn_id,
                    session_id=turn.session_id,
                    preset=self.name,
                    layer=number,
                    label=label,
                    status=status,
                    done=done,
                    total=len(layer),
                )
            )

        async def run_one(index: int) -> bool:
            slot = layer[index]
            view = reference_view(self.messages, tool_result_chars=preset.tool_result_chars, slot_system=slot.system)
            if number > 1:
                view = inject_references(view, previous, missing=previous_missing, silent=preset.silent_degradation)
            upstream = self.upstreams[slot.label]
            try:
                if turn.refused is not None:  # once the budget refused a reference, launch no more
                    raise turn.refused
                payload = slot_payload(slot, view, base={"stream": True}, api=slot.api)
                call = calls[index] = await turn.new_call(
                    role="reference",
                    label=slot.label,
                    provider=upstream.host,
                    model=slot.model,
                    input_messages=view if slot.api == "chat" else payload["input"],
                    streamed=True,
                    secrets=upstream.secrets,
                    responses=ResponsesRequest() if slot.api == "responses" else None,
                    max_output_tokens=slot.max_tokens,
                    hold=holds.get(slot.label),
                )
            except Refusal as refused:
                self.decided("budget_refused", layer=number, label=slot.label, limit=_refused_by(refused))
                reference_done(slot.label, "error")  # refused, so never started: progress still adds up
                return False
            self.engine.emit(
                ReferenceStarted(
                    turn_id=turn.turn_id,
                    session_id=turn.session_id,
                    preset=self.name,
                    layer=number,
                    label=slot.label,
                    model=slot.model,
                    total=len(layer),
                )
            )
            try:
                await self._read_reference(call, upstream, payload)
            finally:
                assert call.usage is not None
                reference_done(slot.label, call.usage.status)
            usable = _usable(call)
            if not usable and call.usage.status == "completed":  # the text the quorum needs is not there
                self.decided("reference_unusable", layer=number, label=slot.label)
            return usable

        outcome = await run_layer(len(layer), run_one, quorum=preset.quorum, grace=preset.grace, task_group=stragglers)
        if outcome.quorum_met_at is not None:
            met = MoaDecision(
                kind="quorum_met",
                at=outcome.quorum_met_at,
                layer=number,
                succeeded=outcome.succeeded,
                total=len(layer),
                quorum=outcome.quorum,
            )
            self.moa_events.append(met)
        for index in outcome.cancelled:
            self.decided("reference_cancelled", layer=number, label=layer[index].label)
        return calls, outcome.allowed_at

    async def _read_reference(self, call: Call, upstream: Upstream, payload: dict[str, Any]) -> None:
        """Stream one reference to its end; its call always ends, whatever stops it.

        A reference that fails (HTTP error, dropped connection, malformed stream) is a failed
        reference, recorded and left out, never the turn's failure; cancellation still propagates.
        """
        timeout = self.preset.reference_timeout
        call.deadline = (anyio.current_time() + timeout, timeout)
        try:
            with anyio.move_on_after(timeout):
                async with self.engine.slots.limiter(upstream.origin):
                    if payload.get("input") is not None:
                        response = await send_responses(call, upstream, payload)
                    else:
                        response = await send_chat(self.engine.quirks, call, upstream, payload)
                    try:
                        async for _ in response.stream:
                            pass
                    finally:
                        await response.aclose()
        except Exception as exc:
            call.end(*call.interrupted(exc))
        except BaseException as exc:
            call.end(*call.interrupted(exc))
            raise
        if not call.ended:  # the deadline passed while waiting for the upstream's capacity
            call.end("error", f"timed out after {timeout:g}s waiting for capacity")


def _usable(call: Call) -> bool:
    """A reference the aggregator can use: it completed with some text (an answer of tool calls
    only, or of nothing, counts toward no quorum and is named among the missing)."""
    return call.usage is not None and call.usage.status == "completed" and bool(call.buffer.text.strip())


def _unusable(status: CallStatus) -> str:
    return "no text in its answer" if status == "completed" else status


def _refused_by(refusal: Refusal) -> str:
    """The limit that refused, as `<scope>.<limit>`; else what refused (an unreachable store)."""
    if isinstance(refusal, BudgetBreach):
        return f"{refusal.scope}.{refusal.limit}"
    return type(refusal).__name__
