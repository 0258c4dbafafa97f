"""The per-call buffer: what an upstream call said, assembled as text from chunks or a body."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from ._events import CallOutput, ToolCall
from ._wire import (
    WireChunk,
    WireCompletion,
    WireToolCall,
    WireUsage,
    any_decoder,
    chunk_decoder,
    completion_decoder,
    error_message,
)

_S = TypeVar("_S", bound=msgspec.Struct)


class _ToolCallParts:
    __slots__ = ("arguments", "id", "index", "name")

    def __init__(self, index: int) -> None:
        self.index = index
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []


class CallBuffer:
    """Accumulates what a model said in one call: the first choice of a chat completion, or the
    output of a Responses call (see `_responses_wire`), whether streamed or not.

    Holds text fragments, never chunk objects, so memory is proportional to what the model said.
    """

    __slots__ = (
        "_content",
        "_reasoning",
        "_refusal",
        "_tools",
        "error",
        "finish_reason",
        "item_done",
        "model",
        "output_chunks",
        "previous_response_id",
        "response_id",
        "system_fingerprint",
        "usage",
    )

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._refusal: list[str] = []
        self._tools: dict[int, _ToolCallParts] = {}
        self.finish_reason: str | None = None
        self.response_id: str | None = None
        self.model: str | None = None
        self.system_fingerprint: str | None = None
        self.usage: WireUsage | Any = None
        """The upstream's usage report: chat's `WireUsage`, or a Responses usage object."""
        self.error: str | None = None
        self.output_chunks = 0
        """Chunks that carried output: the basis of the token estimate when no usage arrives."""
        self.item_done = False
        """A Responses output item was finished (the answer is there, its terminal event may follow)."""
        self.previous_response_id: str | None = None

    # -- streamed input -------------------------------------------------------------------------

    def add_chunk_json(self, data: bytes | str) -> WireChunk | None:
        """Parse one SSE `data` payload into the buffer; None (and `error` set) if it is not JSON."""
        chunk = self._decode(data, chunk_decoder, WireChunk, "stream chunk")
        if chunk is not None:
            self.add_chunk(chunk)
        return chunk

    def decode(self, data: bytes | str, decoder: msgspec.json.Decoder[_S], where: str) -> _S | None:
        """`data` decoded (leniently when a field has an unexpected type); None, with `error` set,
        when it is not JSON or not UTF-8."""
        return self._decode(data, decoder, decoder.type, where)

    def add_text(self, text: str) -> None:
        self._content.append(text)

    def add_reasoning(self, text: str) -> None:
        self._reasoning.append(text)

    def add_refusal(self, text: str) -> None:
        self._refusal.append(text)

    def clear_output(self) -> None:
        """Forget what was said so far (a whole answer that follows replaces it)."""
        self._content, self._reasoning, self._refusal, self._tools = [], [], [], {}
        self.output_chunks = 0

    def tool_parts(self, index: int) -> _ToolCallParts:
        """The tool call at `index`, made on first sight."""
        parts = self._tools.get(index)
        if parts is None:
            parts = self._tools[index] = _ToolCallParts(index)
        return parts

    def _decode(self, data: bytes | str, decoder: msgspec.json.Decoder[_S], cls: type[_S], where: str) -> _S | None:
        try:
            return decoder.decode(data)
        except msgspec.ValidationError:
            return _lenient(data, cls)
        except msgspec.DecodeError as exc:
            self.error = f"malformed JSON in {where}: {exc}"
            return None
        except UnicodeDecodeError as exc:  # msgspec's error for bytes that are not UTF-8
            self.error = f"invalid UTF-8 in {where}: {exc}"
            return None

    def add_chunk(self, chunk: WireChunk) -> None:
        if chunk.error is not None:
            self.error = f"in-stream error: {error_message(chunk.error)}"
            return
        if self.response_id is None:
            self.response_id = chunk.id
            self.model = chunk.model
            self.system_fingerprint = chunk.system_fingerprint
        if chunk.usage is not None:
            # Providers that report usage on every chunk send running totals: keep the latest.
            self.usage = chunk.usage
        if not chunk.choices:
            return
        choice = chunk.choices[0]
        if choice.index != 0:
            choice = next((c for c in chunk.choices if c.index == 0), None)  # type: ignore[assignment]
            if choice is None:
                return
        if choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason
        delta = choice.delta
        if delta is None:
            return
        had_output = False
        if delta.content:
            self._content.append(delta.content)
            had_output = True
        reasoning = delta.reasoning_content or delta.reasoning
        if reasoning:
            self._reasoning.append(reasoning)
            had_output = True
        if delta.refusal:
            self._refusal.append(delta.refusal)
            had_output = True
        if delta.tool_calls:
            self._add_tool_deltas(delta.tool_calls)
            had_output = True
        if had_output:
            self.output_chunks += 1

    def _add_tool_deltas(self, deltas: list[WireToolCall]) -> None:
        for position, delta in enumerate(deltas):
            parts = self.tool_parts(delta.index if delta.index is not None else position)
            if delta.id:
                parts.id = delta.id
            function = delta.function
            if function is not None:
                if function.name:
                    parts.name = function.name
                if function.arguments:
                    parts.arguments.append(function.arguments)

    # -- non-streamed input ---------------------------------------------------------------------

    def add_body(self, body: bytes, *, http_status: int) -> None:
        """Parse a whole response body: a completion, or an error payload for a failed status."""
        if http_status >= 400:
            self.error = f"HTTP {http_status}: {_error_text(body)}"
            return
        completion = self._decode(body, completion_decoder, WireCompletion, "response body")
        if completion is None:
            return
        if completion.error is not None:
            self.error = f"error in response body: {error_message(completion.error)}"
            return
        self.response_id = completion.id
        self.model = completion.model
        self.system_fingerprint = completion.system_fingerprint
        self.usage = completion.usage
        choice = next((c for c in completion.choices or () if c.index == 0), None)
        if choice is None:
            return
        self.finish_reason = choice.finish_reason
        message = choice.message
        if message is None:
            return
        if message.content:
            self._content.append(message.content)
        reasoning = message.reasoning_content or message.reasoning
        if reasoning:
            self._reasoning.append(reasoning)
        if message.refusal:
            self._refusal.append(message.refusal)
        if message.tool_calls:
            self._add_tool_deltas(message.tool_calls)

    # -- results --------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(self._content)

    def has_output(self) -> bool:
        return bool(self._content or self._reasoning or self._refusal or self._tools)

    def output(self) -> CallOutput:
        tools = [
            ToolCall(index=p.index, id=p.id, name=p.name, arguments="".join(p.arguments))
            for p in sorted(self._tools.values(), key=lambda p: p.index)
        ]
        return CallOutput(
            text="".join(self._content),
            reasoning="".join(self._reasoning),
            refusal="".join(self._refusal),
            tool_calls=tools,
        )

    def output_chars(self) -> int:
        tool_chars = sum(len(a) for p in self._tools.values() for a in p.arguments)
        return sum(map(len, self._content)) + sum(map(len, self._reasoning)) + sum(map(len, self._refusal)) + tool_chars


def _error_text(body: bytes) -> str:
    try:
        payload = any_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace") or "empty body"
    if isinstance(payload, dict) and "error" in payload:
        return error_message(payload["error"])
    return error_message(payload)


def _lenient(data: bytes | str, cls: type[_S]) -> _S:
    """Decode what fits `cls` and drop what does not, so an odd field never costs the whole chunk.

    Called only when the strict typed decode failed: a provider sent a known field with another type.
    """
    payload = any_decoder.decode(data)
    if not isinstance(payload, dict):
        return cls()
    return cls(**_convertible(payload, cls))


def _convertible(payload: dict[str, Any], cls: type[msgspec.Struct]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for name in cls.__struct_fields__:
        if name not in payload:
            continue
        try:
            converted = msgspec.convert({name: payload[name]}, cls)
        except msgspec.ValidationError:
            continue
        kept[name] = getattr(converted, name)
    return kept
