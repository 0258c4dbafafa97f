"""The Responses API's request shapes in chat-completions terms, and back.

A MoA turn asked through the Responses API works on chat messages inside (the references' view,
the transcripts of earlier responses), calls chat-completions slots and, for an aggregator whose
upstream has no `/responses`, sends its request as a chat completion (see `_bridge`). These are the
translations: `instructions` and `input` items to messages, function tools and tool choice, options.
"""

from __future__ import annotations

from typing import Any

# Request options that mean the same in both APIs.
_SAME_OPTIONS = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata", "store")


def request_problem(payload: dict[str, Any]) -> tuple[str, str] | None:
    """(message, param) of what makes a Responses request no request a MoA turn can answer, as the API
    would refuse it (a bridged aggregator has no upstream to judge it), or None."""
    given = payload.get("input")
    if not given or not isinstance(given, str | list):
        return "'input' must be a non-empty string or list", "input"
    if isinstance(given, list) and not all(isinstance(item, dict) for item in given):
        return "each item of 'input' must be an object", "input"
    for key in ("instructions", "previous_response_id"):
        value = payload.get(key)
        if value is not None and not isinstance(value, str):
            return f"'{key}' must be a string, got {type(value).__name__}", key
    tools = payload.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
        return "'tools' must be an array of tool objects", "tools"
    return None


def to_messages(instructions: Any, given: Any) -> list[dict[str, Any]]:
    """Chat messages for a Responses request's `instructions` and `input` (a string, or items:
    messages, function calls and their outputs; reasoning items are left out)."""
    messages: list[dict[str, Any]] = []
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
        return messages
    for item in given if isinstance(given, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message" and "role" in item:
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _chat_content(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = messages[-1] if messages else None
            if last is not None and last.get("role") == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls of one turn: one assistant message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
    return messages


def to_input(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses `input` items for chat messages (for a slot called through the Responses API)."""
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            content = message.get("content")
            output = content if isinstance(content, str) else _text_of(content)
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"), "output": output})
            continue
        if message.get("content") not in (None, "", []):
            items.append({"role": role, "content": _text_of(message["content"])})
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": function.get("arguments", ""),
                }
            )
    return items


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Chat function tools for the Responses function tools among `tools` (built-in tools such as
    web search have no chat equivalent and are left out)."""
    converted = []
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("type") == "function":
            function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
            converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def chat_request(payload: dict[str, Any], model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat-completions request that asks what the Responses request `payload` asks, of `model`,
    with `messages` as its conversation."""
    request: dict[str, Any] = {"model": model, "messages": messages}
    if payload.get("stream") is True:
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
    for key in _SAME_OPTIONS:
        if key in payload and key != "store":
            request[key] = payload[key]
    if isinstance(payload.get("max_output_tokens"), int):
        request["max_tokens"] = payload["max_output_tokens"]
    tools = chat_tools(payload.get("tools"))
    if tools:
        request["tools"] = tools
        if "tool_choice" in payload:
            request["tool_choice"] = chat_tool_choice(payload["tool_choice"])
    return request


def _chat_content(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "input_image" and part.get("image_url"):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""
