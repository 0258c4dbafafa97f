"""Token counts of a call: the upstream's report when there is one, an honest estimate otherwise."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from ._buffer import CallBuffer
from ._events import UsageSource
from ._responses_wire import ResponsesUsage

# Roughly four characters per token for English text with BPE tokenizers; per-message overhead
# follows OpenAI's chat format (role and separators). Estimates are marked as such in every event.
_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REQUEST = 3


class Tokens(msgspec.Struct, frozen=True, kw_only=True):
    source: UsageSource
    input: int | None = None
    cached_input: int | None = None
    cache_write: int | None = None
    output: int | None = None
    reasoning: int | None = None


MISSING = Tokens(source="missing")


def resolve_tokens(buffer: CallBuffer, messages: list[Any], *, got_response: bool, streamed: bool) -> Tokens:
    """Reported usage if the upstream sent it; else an estimate if it answered at all; else missing."""
    usage = buffer.usage
    if isinstance(usage, ResponsesUsage):
        if usage.input_tokens is not None and usage.output_tokens is not None:
            cached = usage.input_tokens_details
            reasoning = usage.output_tokens_details
            return Tokens(
                source="reported",
                input=usage.input_tokens,
                cached_input=cached.cached_tokens if cached is not None else None,
                output=usage.output_tokens,
                reasoning=reasoning.reasoning_tokens if reasoning is not None else None,
            )
    elif usage is not None and usage.prompt_tokens is not None and usage.completion_tokens is not None:
        prompt = usage.prompt_tokens_details
        completion = usage.completion_tokens_details
        cache_write = usage.cache_creation_input_tokens
        if cache_write is None and prompt is not None:
            cache_write = prompt.cache_creation_tokens
        return Tokens(
            source="reported",
            input=usage.prompt_tokens,
            cached_input=prompt.cached_tokens if prompt is not None else None,
            cache_write=cache_write,
            output=usage.completion_tokens,
            reasoning=completion.reasoning_tokens if completion is not None else None,
        )
    if not got_response:
        return MISSING
    # Streaming servers send about one token per chunk; a body can only be measured by its length.
    output = buffer.output_chunks if streamed else math.ceil(buffer.output_chars() / _CHARS_PER_TOKEN)
    return Tokens(source="estimated", input=estimate_input_tokens(messages), output=output)


def estimate_input_tokens(messages: list[Any]) -> int:
    chars = 0
    for message in messages:
        if isinstance(message, dict):
            chars += _text_chars(message.get("content"))
            # Responses API items: a function call's arguments, a tool's output
            chars += _text_chars(message.get("arguments")) + _text_chars(message.get("output"))
            for call in message.get("tool_calls") or ():
                if isinstance(call, dict):
                    function = call.get("function")
                    if isinstance(function, dict):
                        chars += _text_chars(function.get("arguments")) + _text_chars(function.get("name"))
    return math.ceil(chars / _CHARS_PER_TOKEN) + _TOKENS_PER_MESSAGE * len(messages) + _TOKENS_PER_REQUEST


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"]) for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0
