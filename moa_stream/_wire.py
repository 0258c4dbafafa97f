"""The parts of OpenAI's chat-completion wire format that the tee reads.

Only the fields we record are declared: msgspec skips the rest without building objects, which is
what keeps parsing a streamed chunk down to a few microseconds. Every field is optional and loosely
typed where providers disagree, so a provider's variant of the format is read rather than rejected.
"""

from __future__ import annotations

from typing import Any

import msgspec


class _Wire(msgspec.Struct, kw_only=True):
    pass


class PromptDetails(_Wire):
    cached_tokens: int | None = None
    cache_creation_tokens: int | None = None


class CompletionDetails(_Wire):
    reasoning_tokens: int | None = None


class WireUsage(_Wire):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: PromptDetails | None = None
    completion_tokens_details: CompletionDetails | None = None
    # Anthropic-style caching fields that some OpenAI-compatible gateways pass through.
    cache_creation_input_tokens: int | None = None


class WireFunction(_Wire):
    name: str | None = None
    arguments: str | None = None


class WireToolCall(_Wire):
    index: int | None = None
    id: str | None = None
    function: WireFunction | None = None


class WireDelta(_Wire):
    content: str | None = None
    reasoning_content: str | None = None
    # vLLM and OpenRouter name the reasoning field `reasoning`.
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: list[WireToolCall] | None = None


class WireChunkChoice(_Wire):
    index: int = 0
    delta: WireDelta | None = None
    finish_reason: str | None = None


class WireChunk(_Wire):
    id: str | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    choices: list[WireChunkChoice] | None = None
    usage: WireUsage | None = None
    error: Any = None


class WireMessage(_Wire):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: list[WireToolCall] | None = None


class WireChoice(_Wire):
    index: int = 0
    message: WireMessage | None = None
    finish_reason: str | None = None


class WireCompletion(_Wire):
    id: str | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    choices: list[WireChoice] | None = None
    usage: WireUsage | None = None
    error: Any = None


chunk_decoder = msgspec.json.Decoder(WireChunk)
completion_decoder = msgspec.json.Decoder(WireCompletion)
any_decoder = msgspec.json.Decoder()
json_encoder = msgspec.json.Encoder()


def error_message(error: Any) -> str:
    """The human-readable part of an OpenAI-style `error` payload, whatever its shape."""
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
    if isinstance(error, str) and error:
        return error
    return "unknown error"
