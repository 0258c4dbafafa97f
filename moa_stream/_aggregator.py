"""The aggregator step of a MoA turn: its request, in the caller's API, retried as `_retry` says.

A chat turn's aggregator is a chat completion. A turn asked through the Responses API calls its
aggregator through the Responses API (with the caller's own options, tools and
`previous_response_id`, the reference block in `instructions` or as a last user message); when that
upstream has no `/responses` (it answered 404 or 405, remembered per upstream), the aggregator is
asked as a chat completion and its answer bridged back into the Responses API (`_bridge`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import anyio

from ._bridge import BridgeStream, ResponseBuilder
from ._chat_reader import Relabel
from ._engine import Engine
from ._errors import Refusal
from ._events import Aggregating
from ._facts import ResponsesRequest
from ._holds import Hold, max_output_of
from ._ids import new_id
from ._meter import Call, Turn
from ._presets import Preset, Slot
from ._prompt import Reference, inject_references
from ._responses_view import chat_request, to_input
from ._retry import backoff, retryable_failure, retryable_status
from ._sdk import for_module
from ._upstream import Upstream, send_chat, send_responses

Api = Literal["chat", "responses"]
Injector = Callable[[list[Any], list[Reference]], list[dict[str, Any]]]
"""Adds the reference block to messages (`_prompt.inject_references` with the preset's settings)."""


def slot_payload(slot: Slot, messages: list[Any], *, base: Mapping[str, Any], api: str = "chat") -> dict[str, Any]:
    """A slot's request: `base` with the slot's model, its conversation and its overrides."""
    if api == "chat":
        payload = {**base, "model": slot.model, "messages": messages}
        overrides = {"temperature": slot.temperature, "max_tokens": slot.max_tokens, "seed": slot.seed}
    else:
        payload = {**base, "model": slot.model, "input": to_input(messages)}
        overrides = {"temperature": slot.temperature, "max_output_tokens": slot.max_tokens}
    payload.update({key: value for key, value in overrides.items() if value is not None})
    payload.update(slot.extra)
    return payload


class AggregatorStep:
    """The aggregator half of `_moa.MoaTurn` (which holds these attributes and `seal`/`refuse`)."""

    engine: Engine
    turn: Turn
    name: str
    model: str
    preset: Preset
    default: Upstream
    payload: dict[str, Any]
    messages: list[Any]
    upstreams: dict[str, Upstream]
    api: str
    cadence: Literal["hit", "miss"] | None
    aggregator_wait_s: float | None
    served_id: str | None
    unknown_previous: str | None
    aggregator_hold: Hold | None
    """Reserved with the first layer (see `_moa_budget`); a retry reserves its own."""

    def seal(self) -> None: ...

    def refuse(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> Any: ...

    def unknown_previous_message(self) -> str:
        aggregator = self.preset.aggregator_slot()
        return (
            f"{self.model}: previous_response_id {self.unknown_previous!r} is not one of the responses this client"
            f" served (it keeps the last {self.engine.transcripts.limit:,}), and the aggregator's upstream"
            f" {self.upstreams[aggregator.label].origin} has no Responses API that could hold it"
        )

    async def aggregate(self, references: list[Reference], missing: list[str], stale: bool, allowed_at: float) -> Any:
        """Send the aggregator request (retrying it as `_retry` says) and return its response."""
        preset, turn = self.preset, self.turn
        aggregator = preset.aggregator_slot()
        upstream = self.upstreams[aggregator.label]
        inject = functools.partial(
            inject_references,
            placement=preset.placement,
            template=preset.template,
            missing=missing,
            silent=preset.silent_degradation,
            stale=stale,
        )
        chat_messages = inject(_with_system(self.messages, aggregator.system), references)
        for attempt in range(preset.aggregator_retries + 1):
            api: Api = "chat"
            if self.api == "responses" and not self.engine.quirks.lacks_responses(upstream.origin):
                api = "responses"
            elif self.api == "responses" and self.unknown_previous is not None:  # bridged: nothing holds it
                return self.refuse(400, self.unknown_previous_message(), param="previous_response_id")
            payload = self._request(api, aggregator, chat_messages, references, inject)
            try:
                call = await turn.new_call(
                    role="aggregator",
                    label=aggregator.label,
                    provider=upstream.host,
                    model=aggregator.model,
                    input_messages=chat_messages if api == "chat" else payload["input"],
                    streamed=payload.get("stream") is True,
                    main=True,
                    secrets=upstream.secrets,
                    responses=ResponsesRequest.of(payload) if api == "responses" else None,
                    max_output_tokens=max_output_of(payload),
                    hold=self.aggregator_hold if attempt == 0 else None,
                )
            except Refusal as refused:
                self.seal()
                return refused.response(self.default.http)
            if attempt == 0:
                self._aggregating(aggregator, len(references), len(missing), allowed_at)
            last = attempt == preset.aggregator_retries
            try:
                response = await self._send(api, call, upstream, payload)
            except Exception as exc:  # no response at all; the call has ended as an error
                if not last and retryable_failure(upstream.http, exc):
                    await anyio.sleep(backoff(attempt))
                    continue
                return self._unreachable(aggregator, upstream, call, exc)
            if api == "responses" and response.status_code in (404, 405):
                self.engine.quirks.learn_lacks_responses(upstream.origin)  # bridge it, now and from now on
                await response.aread()
                await response.aclose()
                if self.unknown_previous is not None:  # bridged, nothing holds that conversation
                    return self.refuse(400, self.unknown_previous_message(), param="previous_response_id")
                if last:  # the attempts are spent: once more, bridged, so that the caller gets an answer
                    return await self._last_bridged(aggregator, upstream, chat_messages)
                continue
            if response.status_code >= 400:
                if not last and retryable_status(response):
                    await response.aread()  # the body says why: the attempt is recorded with its error
                    await response.aclose()
                    await anyio.sleep(backoff(attempt, response.headers))
                    continue
                response.headers["x-should-retry"] = "false"  # the turn has done its retries
            self.seal()
            return response
        raise AssertionError("unreachable: the last attempt always returns")

    def _request(
        self, api: Api, aggregator: Slot, chat_messages: list[Any], references: list[Reference], inject: Injector
    ) -> dict[str, Any]:
        if self.api == "chat":
            return slot_payload(aggregator, chat_messages, base=self.payload)
        if api == "chat":  # bridged: the whole conversation, as a chat completion (usage asked for)
            return slot_payload(
                aggregator, chat_messages, base=chat_request(self.payload, aggregator.model, chat_messages)
            )
        return _native_request(self.payload, aggregator, references, inject, placement=self.preset.placement)

    async def _send(self, api: Api, call: Call, upstream: Upstream, payload: dict[str, Any]) -> Any:
        quirks = self.engine.quirks
        rewrite = _relabel(self.turn, self.api, self.preset.usage, self.model, call.model)
        if api == "responses":
            return await send_responses(call, upstream, payload, rewrite_usage=rewrite)
        if self.api == "chat":
            return await send_chat(quirks, call, upstream, payload, rewrite_usage=rewrite)
        # Bridged: the caller never sees the chat stream, so usage is asked for and read, whatever it sends unasked.
        response = await send_chat(quirks, call, upstream, payload, caller_sees=False)
        if response.status_code >= 400:
            return response
        self.served_id = self.served_id or f"resp_moa_{new_id()}"
        builder = ResponseBuilder(self.served_id, rewrite.model or call.model, self.payload, rewrite)
        http = upstream.http
        headers = {"content-type": "application/json"}
        if payload.get("stream") is True:
            stream = for_module(BridgeStream, http, "AsyncByteStream")(response.stream, builder)
            return http.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)
        return http.Response(200, headers=headers, content=builder.whole(await response.aread()))

    async def _last_bridged(self, aggregator: Slot, upstream: Upstream, chat_messages: list[Any]) -> Any:
        payload = self._request("chat", aggregator, chat_messages, [], inject_references)
        try:
            call = await self.turn.new_call(
                role="aggregator",
                label=aggregator.label,
                provider=upstream.host,
                model=aggregator.model,
                input_messages=chat_messages,
                streamed=payload.get("stream") is True,
                main=True,
                secrets=upstream.secrets,
            )
        except Refusal as refused:
            self.seal()
            return refused.response(self.default.http)
        try:
            response = await self._send("chat", call, upstream, payload)
        except Exception as exc:
            return self._unreachable(aggregator, upstream, call, exc)
        if response.status_code >= 400:
            response.headers["x-should-retry"] = "false"
        self.seal()
        return response

    def _aggregating(self, aggregator: Slot, used: int, missing: int, allowed_at: float) -> None:
        turn = self.turn
        self.engine.emit(
            Aggregating(
                turn_id=turn.turn_id,
                session_id=turn.session_id,
                preset=self.name,
                model=aggregator.model,
                references_used=used,
                references_total=used + missing,
                cadence=self.cadence or "miss",
            )
        )
        self.aggregator_wait_s = time.perf_counter() - allowed_at

    def _unreachable(self, aggregator: Slot, upstream: Upstream, call: Call, exc: Exception) -> Any:
        timed_out = isinstance(exc, upstream.http.TimeoutException)
        reason = call.usage.error if call.usage is not None else None
        message = (
            f"{self.model}: the aggregator {aggregator.label} at {upstream.origin} could not be reached"
            f" ({reason or type(exc).__name__})"
        )
        code = "upstream_timeout" if timed_out else "upstream_unreachable"
        return self.refuse(504 if timed_out else 502, message, code=code)


def _native_request(
    payload: dict[str, Any], aggregator: Slot, references: list[Reference], inject: Injector, *, placement: str
) -> dict[str, Any]:
    """The caller's own Responses request for the aggregator: its input and options as they were
    (the upstream holds the conversation of a `previous_response_id`), with the reference block."""
    instructions = payload.get("instructions")
    head: list[dict[str, Any]] = []
    if aggregator.system is not None:
        head.append({"role": "system", "content": aggregator.system})
    if isinstance(instructions, str) and instructions:
        head.append({"role": "system", "content": instructions})
    injected = inject(head, references)
    given = payload.get("input")
    items = [{"role": "user", "content": given}] if isinstance(given, str) else list(given or [])
    if placement == "user":
        items.append(injected[-1])
        injected = injected[:-1]
    systems = [message["content"] for message in injected if message.get("role") == "system"]
    request = {**payload, "model": aggregator.model, "input": items}
    if systems:
        request["instructions"] = "\n\n".join(text for text in systems if isinstance(text, str))
    overrides = {"temperature": aggregator.temperature, "max_output_tokens": aggregator.max_tokens}
    request.update({key: value for key, value in overrides.items() if value is not None})
    request.update(aggregator.extra)
    return request


def _with_system(messages: list[Any], system: str | None) -> list[Any]:
    """The aggregator slot's own instruction: a system message of its own, ahead of the caller's."""
    return messages if system is None else [{"role": "system", "content": system}, *messages]


def _relabel(turn: Turn, api: str, mode: str, name: str, aggregator_model: str) -> Relabel:
    """What the caller's answer reports (see `Preset.usage`). `turn`: the whole turn's usage, under
    the preset's name (`moa:<name>`), so that a framework's price lookup fails rather than price
    every reference's tokens at the aggregator's rate. `aggregator`: the aggregator's own usage and
    model. Either way with the cost it stands for, where known, as `usage.cost` (OpenRouter's
    field, which LiteLLM and Langfuse read as a provider-reported cost)."""
    names = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
    if api == "responses":
        names = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
    into, out, into_details, out_details = names
    prices = turn.owner.prices

    def rewrite(usage: dict[str, Any]) -> dict[str, Any]:
        usage = dict(usage)
        own = prices.cost(
            aggregator_model,
            input_tokens=_count(usage.get(into)),
            output_tokens=_count(usage.get(out)),
            cached_input_tokens=_count(_detail(usage, into_details, "cached_tokens")),
            reasoning_tokens=_count(_detail(usage, out_details, "reasoning_tokens")),
        )
        costs = [own]
        if mode == "turn":
            references = [u for u in turn.calls_so_far() if u.role == "reference"]
            costs += [u.cost_usd for u in references]
            usage[into] = (usage.get(into) or 0) + sum(u.input_tokens or 0 for u in references)
            usage[out] = (usage.get(out) or 0) + sum(u.output_tokens or 0 for u in references)
            usage["total_tokens"] = usage[into] + usage[out]
            _add_detail(usage, into_details, "cached_tokens", sum(u.cached_input_tokens or 0 for u in references))
            _add_detail(usage, out_details, "reasoning_tokens", sum(u.reasoning_tokens or 0 for u in references))
        if all(cost is not None for cost in costs):
            usage["cost"] = sum(cost for cost in costs if cost is not None)
        return usage

    return Relabel(rewrite, name if mode == "turn" else None)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _detail(usage: dict[str, Any], details: str, name: str) -> object:
    holder = usage.get(details)
    return holder.get(name) if isinstance(holder, dict) else None


def _add_detail(usage: dict[str, Any], group: str, field: str, extra: int) -> None:
    if not extra:
        return
    details = dict(usage.get(group) or {})
    details[field] = (details.get(field) or 0) + extra
    usage[group] = details
