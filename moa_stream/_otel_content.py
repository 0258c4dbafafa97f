"""Message content for `OTelSink(capture_content=True)`: a call's input and output messages in the
GenAI conventions' JSON shape (`gen_ai.input.messages`, `gen_ai.output.messages`), as JSON strings
(span attributes hold no nested maps).

Content comes from the trace record, which went through the client's `redact=` (and the scrubbing
of credentials) before any sink saw it: message texts, refusals, tool arguments and results, a
Responses request's `instructions` (`gen_ai.system_instructions`; for chat completions, system
messages are part of the chat history and stay in the input). Parts redaction does not read
(audio, files) are named by their type only.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from ._events import CallRecord
from ._otel_attrs import text

_encoder: Final = msgspec.json.Encoder()

# OpenAI's finish reasons (chat completions, and a Responses call's recorded status or reason)
# where the conventions name the same thing differently.
_FINISH_REASONS: Final = {
    "tool_calls": "tool_call",
    "function_call": "tool_call",
    "completed": "stop",
    "max_output_tokens": "length",
    "failed": "error",
}


def input_messages(call: CallRecord) -> str | None:
    """`gen_ai.input.messages`: the messages as sent, in order (chat messages or Responses items)."""
    messages = [m for m in (_input_message(item) for item in _items(call.input_messages)) if m is not None]
    return _encoder.encode(messages).decode() if messages else None


def output_messages(call: CallRecord) -> str | None:
    """`gen_ai.output.messages`: the one choice the record keeps, when the upstream answered."""
    output = call.output
    if call.output_source == "none" or output is None:
        return None
    parts: list[dict[str, Any]] = []
    if text(output.reasoning):
        parts.append({"type": "reasoning", "content": output.reasoning})
    if text(output.text):
        parts.append({"type": "text", "content": output.text})
    if text(output.refusal):
        parts.append({"type": "refusal", "content": output.refusal})
    for tool_call in _items(output.tool_calls):
        name = text(getattr(tool_call, "name", None))
        part: dict[str, Any] = {"type": "tool_call", "id": getattr(tool_call, "id", None), "name": name}
        part["arguments"] = _arguments(getattr(tool_call, "arguments", ""))
        parts.append(part)
    reason = text(call.finish_reason) or text(call.usage.finish_reason)
    if reason:
        finish = _FINISH_REASONS.get(reason, reason)
        if finish == "stop" and output.tool_calls:  # a Responses call that ended on tool calls
            finish = "tool_call"
    else:  # cut short, or failed: the conventions ask for a reason all the same
        finish = "error" if call.usage.status == "error" else text(call.usage.status)
    message = {"role": "assistant", "parts": parts, "finish_reason": finish}
    return _encoder.encode([message]).decode()


def _input_message(item: object) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "function_call":  # a Responses tool call
        call = {"type": "tool_call", "id": item.get("call_id"), "name": text(item.get("name"))}
        return {"role": "assistant", "parts": [{**call, "arguments": _arguments(item.get("arguments"))}]}
    if kind == "function_call_output":
        output = item.get("output")
        response = output if isinstance(output, str) else None
        return {
            "role": "tool",
            "parts": [{"type": "tool_call_response", "id": item.get("call_id"), "response": response}],
        }
    role = item.get("role")
    if not isinstance(role, str):
        return {"role": "assistant", "parts": [{"type": text(kind) or "unknown"}]}  # reasoning and other items
    if role == "tool":
        response = _joined(item.get("content"))
        return {
            "role": "tool",
            "parts": [{"type": "tool_call_response", "id": item.get("tool_call_id"), "response": response}],
        }
    parts = _parts(item.get("content"))
    for tool_call in _items(item.get("tool_calls")):
        function = tool_call.get("function") if isinstance(tool_call, dict) else None
        if isinstance(function, dict):
            parts.append(
                {
                    "type": "tool_call",
                    "id": tool_call.get("id") if isinstance(tool_call, dict) else None,
                    "name": text(function.get("name")),
                    "arguments": _arguments(function.get("arguments")),
                }
            )
    message: dict[str, Any] = {"role": role, "parts": parts}
    if text(item.get("name")):
        message["name"] = item["name"]
    return message


def _parts(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in _items(content):
        if not isinstance(part, dict):
            continue
        kind = text(part.get("type"))
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "content": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "content": part["refusal"]})
        elif kind in ("image_url", "input_image"):
            parts.append(_image(part))
        else:  # audio, files: named by their type only
            parts.append({"type": kind or "unknown"})
    return parts


def _image(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
        head, _, data = url.partition(";base64,")
        return {"type": "blob", "modality": "image", "mime_type": head[5:] or None, "content": data}
    if isinstance(url, str):
        return {"type": "uri", "modality": "image", "uri": url}
    if isinstance(part.get("file_id"), str):
        return {"type": "file", "modality": "image", "file_id": part["file_id"]}
    return {"type": "image"}


def _joined(content: object) -> str:
    if isinstance(content, str):
        return content
    return "".join(text(part.get("text")) for part in _items(content) if isinstance(part, dict))


def _arguments(arguments: object) -> object:
    """Tool arguments as the JSON value they spell, or as written when they are not JSON."""
    if not isinstance(arguments, str):
        return None
    try:
        return msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return arguments


def _items(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def system_instructions(call: CallRecord) -> str | None:
    """`gen_ai.system_instructions` for a Responses call's `instructions` (redacted), else None."""
    if not call.instructions:
        return None
    return _encoder.encode([{"type": "text", "content": call.instructions}]).decode()
