"""A Mixture-of-Agents turn: references fan out, the aggregator's response goes back to the caller.

The turn is several metered upstream calls plus one teed aggregator stream: references are read to
their end here (or cancelled), then the aggregator's response is returned to the caller's SDK as if
it had asked the aggregator directly, with the references' answers injected into its messages.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import anyio
import anyio.abc
import openai

from ._budget import BUDGET_ERROR, BUDGET_HEADER, BudgetBreach
from ._cadence import CachedReferences, ReferenceCache, user_turn_key
from ._config import Preset, Slot
from ._events import Aggregating, CallStatus, CallUsage, ReferenceDone, ReferenceStarted
from ._fanout import run_layer
from ._ledger import SessionStateError
from ._meter import Call, Engine, Turn
from ._prompt import Reference, inject_references, reference_view
from ._upstream import Upstream, send_chat
from ._wire import json_encoder

MOA_PREFIX = "moa:"

DEFAULT_UPSTREAM_CONCURRENCY = 16
"""Reference calls in flight at once per upstream (scheme, host and port)."""


class MoaError(Exception):
    """A preset cannot run as configured (for example a slot's API key variable is not set)."""


class Presets:
    """The presets of a wrapped client and what they keep between turns: reference caches,
    per-upstream capacity limiters, and the clients of slots that name their own base URL."""

    def __init__(self, presets: Mapping[str, Preset], *, upstream_concurrency: int = DEFAULT_UPSTREAM_CONCURRENCY):
        if upstream_concurrency < 1:
            raise ValueError(f"upstream_concurrency must be at least 1, got {upstream_concurrency!r}")
        self.presets = dict(presets)
        self._concurrency = upstream_concurrency
        self._caches = {
            name: ReferenceCache(entries=preset.cache_entries, ttl_s=preset.cache_ttl_s)
            for name, preset in presets.items()
        }
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._own_clients: dict[tuple[str, str | None], openai.AsyncOpenAI] = {}
        self._client_upstreams: dict[int, Upstream] = {}

    def limiter(self, origin: str) -> anyio.CapacityLimiter:
        limiter = self._limiters.get(origin)
        if limiter is None:
            limiter = self._limiters[origin] = anyio.CapacityLimiter(self._concurrency)
        return limiter

    def upstream_for(self, slot: Slot, default: Upstream) -> Upstream:
        client = slot.client
        if client is None and slot.base_url is not None:
            client = self._own_client(slot.base_url, slot.api_key_env)
        if client is None:
            return default
        upstream = self._client_upstreams.get(id(client))
        if upstream is None:
            upstream = self._client_upstreams[id(client)] = Upstream.of_client(client)
        return upstream

    def _own_client(self, base_url: str, key_env: str | None) -> openai.AsyncOpenAI:
        client = self._own_clients.get((base_url, key_env))
        if client is None:
            key = os.environ.get(key_env) if key_env else "none"
            if key is None:
                raise MoaError(f"environment variable {key_env} (api_key_env of the slot for {base_url}) is not set")
            client = self._own_clients[(base_url, key_env)] = openai.AsyncOpenAI(base_url=base_url, api_key=key)
        return client

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for client in self._own_clients.values():
                await client.close()


async def run_turn(
    presets: Presets, engine: Engine, default: Upstream, payload: dict[str, Any], *, body: bytes, session_id: str
) -> Any:
    """Answer a `moa:<name>` request: the aggregator's response, teed, or an error response.

    Every request ends one turn, a refused one too. The caller's SDK never reruns a turn: errors
    come back with `x-should-retry: false`, and the turn retries its aggregator itself."""
    model = str(payload["model"])
    try:
        turn = engine.new_turn(session_id=session_id, model=model)
    except SessionStateError as exc:
        return session_error_response(default.http, exc)
    turn.note_inputs(body, default.secrets)
    name = model[len(MOA_PREFIX) :]
    preset = presets.presets.get(name)
    if preset is None:
        known = ", ".join(f"moa:{n}" for n in sorted(presets.presets)) or "none are configured"
        message = f"unknown MoA preset {model!r}; presets: {known}"
        return _refused(turn, default.http, 404, message, param="model", code="model_not_found")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        message = f"{model}: 'messages' must be a non-empty list"
        return _refused(turn, default.http, 400, message, param="messages")
    try:
        upstreams = {
            slot.label: presets.upstream_for(slot, default)
            for slot in [*(s for layer in preset.reference_layers() for s in layer), preset.aggregator_slot()]
        }
    except MoaError as exc:
        return _refused(turn, default.http, 500, f"{model}: {exc}")

    turn.preset = name
    try:
        # Stragglers cancelled by the quorum rule wind down in this group while the aggregator's
        # request goes out; leaving it waits for them, after the response has arrived.
        async with anyio.create_task_group() as stragglers:
            return await _answer(presets, preset, name, turn, upstreams, messages, payload, default, stragglers)
    except BaseExceptionGroup as group:
        turn.seal()  # every call has ended; the turn still gets its TurnEnd and trace
        if len(group.exceptions) == 1:
            # The aggregator's own failure, unwrapped: the caller's SDK maps it as for any call.
            raise group.exceptions[0] from None
        raise
    except BaseException:
        turn.seal()
        raise


def _refused(
    turn: Turn, http: ModuleType, status: int, message: str, *, param: str | None = None, code: str | None = None
) -> Any:
    """End a turn that could not give an answer; its error response says why, and so does its `TurnEnd`."""
    turn.fail(message)
    turn.seal()
    return error_response(http, status, message, param=param, code=code)


async def _answer(
    presets: Presets,
    preset: Preset,
    name: str,
    turn: Turn,
    upstreams: dict[str, Upstream],
    messages: list[Any],
    payload: dict[str, Any],
    default: Upstream,
    stragglers: anyio.abc.TaskGroup,
) -> Any:
    model = f"{MOA_PREFIX}{name}"
    references, missing, stale, allowed_at = await _gather_references(
        presets, preset, name, turn, upstreams, messages, stragglers
    )
    if not references and preset.on_all_failed == "error":
        if turn.refused is not None:  # the budget stopped the fan-out: that is the error to report
            turn.seal()
            return refusal_response(default.http, turn.refused)
        failures = "; ".join(f"{u.label}: {u.error or _unusable(u)}" for u in turn.calls_so_far())
        return _refused(turn, default.http, 502, f"{model}: every reference failed ({failures})")

    aggregator = preset.aggregator_slot()
    upstream = upstreams[aggregator.label]
    agg_messages = inject_references(
        _with_system(messages, aggregator.system),
        references,
        placement=preset.placement,
        template=preset.template,
        missing=missing,
        silent=preset.silent_degradation,
        stale=stale,
    )
    agg_payload = _slot_payload(aggregator, agg_messages, base=payload)
    rewrite = _turn_usage(turn) if preset.usage == "turn" else None
    for attempt in range(preset.aggregator_retries + 1):
        try:
            call = turn.new_call(
                role="aggregator",
                label=aggregator.label,
                provider=upstream.host,
                model=aggregator.model,
                input_messages=agg_messages,
                streamed=agg_payload.get("stream") is True,
                main=True,
                secrets=upstream.secrets,
            )
        except BudgetBreach as breach:
            turn.seal()
            return refusal_response(default.http, breach)
        if attempt == 0:
            turn.engine.emit(
                Aggregating(
                    turn_id=turn.turn_id,
                    session_id=turn.session_id,
                    preset=name,
                    model=aggregator.model,
                    references_used=len(references),
                    references_total=len(references) + len(missing),
                    cadence=turn.cadence or "miss",
                )
            )
            turn.aggregator_wait_s = time.perf_counter() - allowed_at
        last = attempt == preset.aggregator_retries
        try:
            response = await send_chat(turn.engine, call, upstream, agg_payload, rewrite_usage=rewrite)
        except Exception as exc:  # no response at all; the call has ended as an error
            if not last and _retryable_failure(upstream, exc):
                await anyio.sleep(_backoff(attempt, None))
                continue
            timed_out = isinstance(exc, upstream.http.TimeoutException)
            reason = call.usage.error if call.usage is not None else None
            message = (
                f"{model}: the aggregator {aggregator.label} at {upstream.origin} could not be reached"
                f" ({reason or type(exc).__name__})"
            )
            code = "upstream_timeout" if timed_out else "upstream_unreachable"
            return _refused(turn, default.http, 504 if timed_out else 502, message, code=code)
        if response.status_code >= 400:
            if not last and _retryable_status(response):
                await response.aread()  # the body says why: the attempt is recorded with its error
                await response.aclose()
                await anyio.sleep(_backoff(attempt, response.headers))
                continue
            response.headers["x-should-retry"] = "false"  # the turn has done its retries
        turn.seal()
        return response
    raise AssertionError("unreachable: the last attempt always returns")


# The statuses on which the openai SDK retries, and which the turn retries for its aggregator.
_RETRYABLE_STATUSES = frozenset({408, 409, 429})
_MAX_BACKOFF_S = 8.0
_MAX_RETRY_AFTER_S = 60.0


def _retryable_status(response: Any) -> bool:
    if response.headers.get("x-should-retry") == "false":
        return False
    return response.status_code in _RETRYABLE_STATUSES or response.status_code >= 500


def _retryable_failure(upstream: Upstream, exc: Exception) -> bool:
    """A dropped or timed-out exchange may go through on a second try; a refused connection (or a
    name that does not resolve) will not, so it is not retried."""
    return isinstance(exc, upstream.http.TransportError) and not isinstance(exc, upstream.http.ConnectError)


def _backoff(attempt: int, headers: Any) -> float:
    """The SDK's schedule: the server's retry-after when it gives a sane one, else 0.5 s doubling."""
    if headers is not None:
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                seconds = float(headers.get(name, "")) * scale
            except ValueError:
                continue
            if 0 <= seconds <= _MAX_RETRY_AFTER_S:
                return seconds
    return min(0.5 * 2.0**attempt, _MAX_BACKOFF_S) * (1 - 0.25 * random.random())


def _unusable(usage: CallUsage) -> str:
    return "no text in its answer" if usage.status == "completed" else usage.status


async def _gather_references(
    presets: Presets,
    preset: Preset,
    name: str,
    turn: Turn,
    upstreams: dict[str, Upstream],
    messages: list[Any],
    stragglers: anyio.abc.TaskGroup,
) -> tuple[list[Reference], list[str], bool, float]:
    """The last layer's answers, the labels that failed, whether they predate newer tool results,
    and when the fan-out rule allowed the aggregator to start."""
    cache = presets._caches[name]
    key = None if preset.cadence == "per_call" else user_turn_key(name, turn.session_id, messages)
    if key is not None:
        cached = cache.get(key, every_n=preset.every_n if preset.cadence == "every_n" else None)
        if cached is not None:
            turn.cadence = "hit"
            stale = len(messages) > cached.transcript_length
            return list(cached.references), list(cached.missing), stale, time.perf_counter()
    turn.cadence = "miss"

    references: list[Reference] = []
    missing: list[str] = []
    allowed_at = time.perf_counter()
    for number, layer in enumerate(preset.reference_layers(), start=1):
        # A proposer of a later layer sees the previous layer's answers.
        calls, allowed_at = await _fan_out(
            presets, preset, turn, upstreams, messages, layer, number, references, missing, stragglers
        )
        references, missing = [], []
        for slot, call in zip(layer, calls, strict=True):
            if call is not None and _usable(call):
                references.append(Reference(slot.label, call.buffer.text))
            else:
                missing.append(slot.label)
    if key is not None and references:
        cache.put(key, CachedReferences(references=references, missing=missing, transcript_length=len(messages)))
    return references, missing, False, allowed_at


async def _fan_out(
    presets: Presets,
    preset: Preset,
    turn: Turn,
    upstreams: dict[str, Upstream],
    messages: list[Any],
    layer: list[Slot],
    number: int,
    previous: list[Reference],
    previous_missing: list[str],
    stragglers: anyio.abc.TaskGroup,
) -> tuple[list[Call | None], float]:
    """Run one layer's references; their calls in slot order, and when the quorum rule was met."""
    calls: list[Call | None] = [None] * len(layer)
    done = 0
    name = turn.preset or ""

    async def run_one(index: int) -> bool:
        slot = layer[index]
        view = reference_view(messages, tool_result_chars=preset.tool_result_chars, slot_system=slot.system)
        if number > 1:
            view = inject_references(view, previous, missing=previous_missing, silent=preset.silent_degradation)
        upstream = upstreams[slot.label]
        try:
            if turn.refused is not None:  # once the budget refused a reference, launch no more
                raise turn.refused
            call = calls[index] = turn.new_call(
                role="reference",
                label=slot.label,
                provider=upstream.host,
                model=slot.model,
                input_messages=view,
                streamed=True,
                secrets=upstream.secrets,
            )
        except BudgetBreach:
            reference_done(slot.label, "error")  # refused, so never started: progress still adds up
            return False
        turn.engine.emit(
            ReferenceStarted(
                turn_id=turn.turn_id,
                session_id=turn.session_id,
                preset=name,
                layer=number,
                label=slot.label,
                model=slot.model,
                total=len(layer),
            )
        )
        try:
            await _read_reference(presets, preset, call, upstream, _slot_payload(slot, view, base={"stream": True}))
        finally:
            assert call.usage is not None
            reference_done(slot.label, call.usage.status)
        return _usable(call)

    def reference_done(label: str, status: CallStatus) -> None:
        nonlocal done
        done += 1
        turn.engine.emit(
            ReferenceDone(
                turn_id=turn.turn_id,
                session_id=turn.session_id,
                preset=name,
                layer=number,
                label=label,
                status=status,
                done=done,
                total=len(layer),
            )
        )

    allowed_at = await run_layer(len(layer), run_one, quorum=preset.quorum, grace=preset.grace, task_group=stragglers)
    return calls, allowed_at


async def _read_reference(
    presets: Presets, preset: Preset, call: Call, upstream: Upstream, payload: dict[str, Any]
) -> None:
    """Stream one reference to its end; its call always ends, whatever stops it.

    A reference that fails (HTTP error, dropped connection, malformed stream) is a failed
    reference, recorded and left out, never the turn's failure; cancellation still propagates.
    """
    timeout = preset.reference_timeout
    call.deadline = (anyio.current_time() + timeout, timeout)
    try:
        with anyio.move_on_after(timeout):
            async with presets.limiter(upstream.origin):
                response = await send_chat(call.turn.engine, call, upstream, payload)
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


def _with_system(messages: list[Any], system: str | None) -> list[Any]:
    """The aggregator slot's own instruction: a system message of its own, ahead of the caller's."""
    return messages if system is None else [{"role": "system", "content": system}, *messages]


def _slot_payload(slot: Slot, messages: list[Any], *, base: Mapping[str, Any]) -> dict[str, Any]:
    payload = {**base, "model": slot.model, "messages": messages}
    for field in ("temperature", "max_tokens", "seed"):
        value = getattr(slot, field)
        if value is not None:
            payload[field] = value
    payload.update(slot.extra)
    return payload


def _turn_usage(turn: Turn) -> Any:
    """Adds the references' tokens to the usage the caller sees, so budgets count the whole turn."""

    def rewrite(usage: dict[str, Any]) -> dict[str, Any]:
        references = [u for u in turn.calls_so_far() if u.role == "reference"]
        extra_in = sum(u.input_tokens or 0 for u in references)
        extra_out = sum(u.output_tokens or 0 for u in references)
        usage = dict(usage)
        usage["prompt_tokens"] = (usage.get("prompt_tokens") or 0) + extra_in
        usage["completion_tokens"] = (usage.get("completion_tokens") or 0) + extra_out
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        cached = sum(u.cached_input_tokens or 0 for u in references)
        reasoning = sum(u.reasoning_tokens or 0 for u in references)
        _add_detail(usage, "prompt_tokens_details", "cached_tokens", cached)
        _add_detail(usage, "completion_tokens_details", "reasoning_tokens", reasoning)
        return usage

    return rewrite


def _add_detail(usage: dict[str, Any], group: str, field: str, extra: int) -> None:
    if not extra:
        return
    details = dict(usage.get(group) or {})
    details[field] = (details.get(field) or 0) + extra
    usage[group] = details


def error_response(
    http: ModuleType,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    body: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """An error in OpenAI's JSON shape; the SDK raises it as the matching APIStatusError, unretried."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = body or {"error": {"message": message, "type": kind, "param": param, "code": code}}
    all_headers = {"content-type": "application/json", "x-should-retry": "false", **(headers or {})}
    return http.Response(status, headers=all_headers, content=json_encoder.encode(body))


def refusal_response(http: ModuleType, breach: BudgetBreach) -> Any:
    """A call a budget refused: a 400 that the wrapped client raises as `BudgetExceeded`."""
    return error_response(http, 400, breach.message(), body=breach.body(), headers={BUDGET_HEADER: BUDGET_ERROR})


def session_error_response(http: ModuleType, error: SessionStateError) -> Any:
    return error_response(http, 500, str(error), code="session_state_error")
