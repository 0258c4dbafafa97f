"""The parts of OpenAI's Responses API wire format that the tee reads, and how they fill a call.

Only the fields we record are declared; every one is optional, so a provider's variant is read
rather than rejected. Streams are typed events (`event: response.output_text.delta` ...) closed by
one terminal event (`response.completed`, `response.incomplete` or `response.failed`) that carries
the whole response with its usage; a stream that stops before one has no usage of its own.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ._buffer import CallBuffer


class _Wire(msgspec.Struct, kw_only=True):
    pass


class InputDetails(_Wire):
    cached_tokens: int | None = None


class OutputDetails(_Wire):
    reasoning_tokens: int | None = None


class ResponsesUsage(_Wire):
    input_tokens: int | None = None
    """Cached tokens included."""
    input_tokens_details: InputDetails | None = None
    output_tokens: int | None = None
    """Reasoning tokens included."""
    output_tokens_details: OutputDetails | None = None


class Part(_Wire):
    type: str | None = None
    text: str | None = None
    refusal: str | None = None


class Item(_Wire):
    type: str | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    content: list[Part] | None = None
    summary: list[Part] | None = None


class Incomplete(_Wire):
    reason: str | None = None


class Response(_Wire):
    id: str | None = None
    model: str | None = None
    status: str | None = None
    usage: ResponsesUsage | None = None
    output: list[Item] | None = None
    incomplete_details: Incomplete | None = None
    error: Any = None
    previous_response_id: str | None = None
    background: bool | None = None


class _Delta(_Wire):
    delta: str | None = None
    output_index: int = 0


class _ItemEvent(_Wire):
    output_index: int = 0
    item: Item | None = None


class _ResponseEvent(_Wire):
    response: Response | None = None


class _ErrorEvent(_Wire):
    code: Any = None
    message: str | None = None


class _Typed(_Wire):
    type: str | None = None


TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
"""The events that close a Responses stream, each with the whole response and its usage."""
_FINISHED = frozenset({"completed", "incomplete", "failed", "cancelled"})

_delta = msgspec.json.Decoder(_Delta)
_item_event = msgspec.json.Decoder(_ItemEvent)
_response_event = msgspec.json.Decoder(_ResponseEvent)
_error_event = msgspec.json.Decoder(_ErrorEvent)
_typed = msgspec.json.Decoder(_Typed)
_response = response_decoder = msgspec.json.Decoder(Response)

_TEXT_DELTAS = {
    "response.output_text.delta": CallBuffer.add_text,
    "response.refusal.delta": CallBuffer.add_refusal,
    "response.reasoning_summary_text.delta": CallBuffer.add_reasoning,
    "response.reasoning_text.delta": CallBuffer.add_reasoning,
}


def event_type(name: bytes | None, data: bytes) -> str | None:
    """An event's type: its `event:` line, else the `type` of its JSON."""
    if name is not None:
        return name.decode("ascii", "replace")
    return _typed.decode(data).type


def add_event(buffer: CallBuffer, kind: str, data: bytes) -> bool:
    """Record one Responses event into `buffer`; True when it was output (the basis of the token
    estimate and of the time to first output)."""
    add_text = _TEXT_DELTAS.get(kind)
    if add_text is not None:
        delta = buffer.decode(data, _delta, "stream event")
        if delta is not None and delta.delta:
            add_text(buffer, delta.delta)
            buffer.output_chunks += 1
            return True
        return False
    if kind == "response.function_call_arguments.delta":
        delta = buffer.decode(data, _delta, "stream event")
        if delta is not None and delta.delta:
            buffer.tool_parts(delta.output_index).arguments.append(delta.delta)
            buffer.output_chunks += 1
            return True
        return False
    if kind in ("response.output_item.added", "response.output_item.done"):
        event = buffer.decode(data, _item_event, "stream event")
        item = event.item if event is not None else None
        if event is not None and item is not None and item.type == "function_call":
            parts = buffer.tool_parts(event.output_index)
            parts.id, parts.name = item.call_id or parts.id, item.name or parts.name
            if kind.endswith("done") and not parts.arguments and item.arguments:
                parts.arguments.append(item.arguments)  # a server that sent no argument deltas
        if kind.endswith("done"):
            buffer.item_done = True
        return False
    if kind == "error":
        error = buffer.decode(data, _error_event, "stream event")
        message = error.message if error is not None else None
        buffer.error = f"in-stream error: {message or 'unknown error'}"
        return False
    if kind in TERMINAL or kind in ("response.created", "response.in_progress", "response.queued"):
        snapshot = buffer.decode(data, _response_event, "stream event")
        if snapshot is not None and snapshot.response is not None:
            _add_facts(buffer, snapshot.response)
    return False


def add_response_body(buffer: CallBuffer, body: bytes) -> Response | None:
    """Record a whole (non-streamed) Response object: its output items and its facts."""
    response = buffer.decode(body, _response, "response body")
    if response is None:
        return None
    for index, item in enumerate(response.output or ()):
        if item.type == "message":
            for part in item.content or ():
                if part.type == "output_text" and part.text:
                    buffer.add_text(part.text)
                elif part.type == "refusal" and part.refusal:
                    buffer.add_refusal(part.refusal)
        elif item.type == "function_call":
            parts = buffer.tool_parts(index)
            parts.id, parts.name = item.call_id, item.name
            if item.arguments:
                parts.arguments.append(item.arguments)
        elif item.type == "reasoning":
            for part in item.summary or ():
                if part.text:
                    buffer.add_reasoning(part.text)
    _add_facts(buffer, response)
    return response


def finished(response: Response) -> bool:
    """The response has reached a final status (not queued or in progress)."""
    return response.status in _FINISHED


def _add_facts(buffer: CallBuffer, response: Response) -> None:
    buffer.response_id = response.id or buffer.response_id
    buffer.model = response.model or buffer.model
    buffer.previous_response_id = response.previous_response_id or buffer.previous_response_id
    if response.usage is not None:
        buffer.usage = response.usage
    status = response.status
    if status is None or status in ("queued", "in_progress"):
        return
    reason = response.incomplete_details.reason if response.incomplete_details is not None else None
    buffer.finish_reason = reason if status == "incomplete" and reason else status
    if status == "failed":
        buffer.error = f"response failed: {_failure(response.error)}"


def _failure(error: Any) -> str:
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        return ": ".join(str(part) for part in (code, message) if part) or "no reason given"
    return str(error) if error else "no reason given"
