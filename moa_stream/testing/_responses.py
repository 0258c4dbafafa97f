"""The Responses API on the simulator: a Responses request becomes the equivalent chat request, so that
`_chat.plan` decides the reply, and responses are kept by id for `previous_response_id`, `retrieve`
and `cancel`, background ones on the simulator's clock."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
from collections.abc import Iterator
from typing import Any, Final

import anyio
import msgspec

from ._chat import _Plan
from ._responses_wire import Rendition

KEPT: Final = 1000
"""How many responses the simulator keeps by id (the oldest go first)."""

_canonical: Final = msgspec.json.Encoder(order="deterministic")
_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})


def validate(request: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) of the first thing wrong with a Responses create request."""
    if not isinstance(request.get("model"), str) or not request["model"]:
        return "model", "you must provide a model parameter"
    items = request.get("input")
    if items is None and request.get("previous_response_id") is None:
        return "input", "Missing required parameter: 'input'."
    listed = isinstance(items, list) and all(isinstance(item, dict) for item in items)
    if items is not None and not isinstance(items, str) and not listed:
        return "input", "'input' must be a string or an array of input items"
    limit = request.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        return "max_output_tokens", f"'max_output_tokens' must be an integer >= 1, got {limit!r}"
    temperature = request.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or isinstance(temperature, bool)):
        return "temperature", f"'temperature' must be a number, got {temperature!r}"
    tools = request.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        return "tools", "'tools' must be an array of tool objects"
    previous = request.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        return "previous_response_id", f"'previous_response_id' must be a string, got {previous!r}"
    return None


def id_for(request: dict[str, Any]) -> str:
    """`resp_` and a digest of the request: one request is one response, streamed or not."""
    key = {k: v for k, v in request.items() if k != "stream"}
    return "resp_" + hashlib.sha256(_canonical.encode(key)).hexdigest()[:48]


def chat_request(request: dict[str, Any], history: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The chat request `plan()` answers for `request`, and the conversation to keep (`history`, then
    the new input; `instructions` stay out of it, as OpenAI does not carry them over)."""
    items = request.get("input")
    new = [{"role": "user", "content": items}] if isinstance(items, str) else _messages(items or [])
    conversation = [*history, *new]
    instructions = request.get("instructions")
    system = [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
    chat: dict[str, Any] = {"model": request["model"], "messages": [*system, *conversation]}
    tools = [_chat_tool(t) for t in request.get("tools") or () if t.get("type") == "function"]
    if tools:
        chat["tools"] = tools
    choice = request.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if request.get("max_output_tokens") is not None:
        chat["max_tokens"] = request["max_output_tokens"]
    if request.get("temperature") is not None:
        chat["temperature"] = request["temperature"]
    return chat, conversation


def reply_messages(plan: _Plan) -> list[dict[str, Any]]:
    """The reply as chat messages, for the conversation a later `previous_response_id` continues."""
    call = plan.tool_call
    if call is None:
        return [{"role": "assistant", "content": " ".join(plan.content)}]
    function = {"name": call.name, "arguments": call.arguments}
    return [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call.id, "type": "function", "function": function}],
        }
    ]


def _messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in _ROLES:
            messages.append({"role": item["role"], "content": _text(item.get("content"))})
        elif kind == "function_call":
            function = {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", ""))}
            call = {"id": str(item.get("call_id", "")), "type": "function", "function": function}
            previous = messages[-1] if messages else None
            # Parallel calls arrive as consecutive items; chat carries them in one assistant message.
            if previous is not None and previous["role"] == "assistant" and previous.get("tool_calls"):
                previous["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": _text(output)})
        # Reasoning items, item references and the like add nothing the plan looks at.
    return messages


def _text(content: object) -> str:
    """Content as one string: the text parts (`input_text`, `output_text`) joined by a space, which
    the simulator's tokenizer counts as it counts the parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return " ".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


# -- kept responses ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Kept:
    """A response the simulator keeps: what it says, the conversation it ends, and for a background
    response when it started on the simulator's clock (it is done once its events' delays have passed)."""

    rendition: Rendition
    conversation: list[dict[str, Any]]
    events: list[tuple[bytes, float]]
    started: float
    cancelled: bool = False
    played: bool = False
    """A replay sent its last event: done, even if the clock's rounding woke that wait a hair early."""

    @property
    def duration(self) -> float:
        """The plan's simulated generation time: ttft plus one token delay per further delta."""
        return sum(delay for _, delay in self.events)

    def finished(self) -> bool:
        if not self.rendition.background:
            return True
        return not self.cancelled and (self.played or anyio.current_time() >= self.started + self.duration)

    def document(self) -> dict[str, Any]:
        """What `retrieve` answers now."""
        if self.cancelled:
            return self.rendition.document("cancelled")
        if not self.finished():
            return self.rendition.document("in_progress")
        return self.rendition.document()

    def cancel(self) -> dict[str, Any]:
        """Cancel it unless it has finished; what `cancel` answers."""
        if not self.finished():
            self.cancelled = True
        return self.document()

    def replay(self, after: int) -> Iterator[tuple[bytes, float]]:
        """The events after sequence number `after`, each due when it would have been sent by a
        stream that began at `started`; ends early once the response is cancelled."""
        offsets = itertools.accumulate(delay for _, delay in self.events)
        for number, ((event, _), offset) in enumerate(zip(self.events, offsets, strict=True)):
            if self.cancelled:
                return
            if number > after:
                yield event, max(self.started + offset - anyio.current_time(), 0.0)
        # Resumed after the last event went out, so its wait is over.
        if after < len(self.events) - 1:
            self.played = True


class ResponseStore:
    """The last `KEPT` responses by id."""

    def __init__(self, size: int = KEPT) -> None:
        self._size = size
        self._kept: collections.OrderedDict[str, Kept] = collections.OrderedDict()

    def get(self, id_: str) -> Kept | None:
        return self._kept.get(id_)

    def keep(self, kept: Kept) -> None:
        self._kept[kept.rendition.id] = kept
        self._kept.move_to_end(kept.rendition.id)
        while len(self._kept) > self._size:
            self._kept.popitem(last=False)
