"""The Responses API as the simulator writes it: a `Response` document and its SSE events, both
made from the same deterministic plan as a chat completion, field for field as OpenAI sends them."""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import msgspec

from ._chat import BROKEN_UTF8, CREATED, _Plan

_json: Final = msgspec.json.Encoder()
# The request fields every `Response` echoes (before and after its output, in OpenAI's order), with
# what OpenAI reports when the request left them out.
_ECHOED_HEAD: Final[tuple[tuple[str, Any], ...]] = (
    ("instructions", None),
    ("max_output_tokens", None),
    ("max_tool_calls", None),
    ("model", None),
)
_ECHOED_TAIL: Final[tuple[tuple[str, Any], ...]] = (
    ("parallel_tool_calls", True),
    ("previous_response_id", None),
    ("prompt_cache_key", None),
    ("reasoning", {"effort": None, "summary": None}),
    ("safety_identifier", None),
    ("service_tier", "default"),
    ("store", True),
    ("temperature", 1.0),
    ("text", {"format": {"type": "text"}}),
    ("tool_choice", "auto"),
    ("tools", []),
    ("top_logprobs", 0),
    ("top_p", 1.0),
    ("truncation", "disabled"),
)


def sse(event: dict[str, Any]) -> bytes:
    """One Responses SSE event: its `type` on the `event:` line, the whole event as `data:`."""
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + _json.encode(event) + b"\n\n"


def error_event(sequence_number: int) -> bytes:
    """The in-stream `error` event of the `stream_error` fault."""
    error = {
        "type": "error",
        "code": "sim_error",
        "message": "simulated in-stream error",
        "param": None,
        "sequence_number": sequence_number,
    }
    return sse(error)


def broken_event(sequence_number: int) -> bytes:
    """A text delta whose JSON string ends in half a multibyte character (the `invalid_utf8` fault)."""
    delta = {
        "type": "response.output_text.delta",
        "sequence_number": sequence_number,
        "item_id": "msg_sim_broken",
        "output_index": 0,
        "content_index": 0,
        "delta": " caf\u00e9",
        "logprobs": [],
    }
    return sse(delta).replace("é".encode(), BROKEN_UTF8)


@dataclasses.dataclass(frozen=True, slots=True)
class Rendition:
    """One planned response in the Responses API's shapes: whole, as a snapshot, or as SSE events."""

    id: str
    plan: _Plan
    request: dict[str, Any]
    include_usage: bool
    """False under the `no_usage` fault: the terminal event and the body say `usage: null`."""

    @property
    def background(self) -> bool:
        return self.request.get("background") is True

    @property
    def status(self) -> str:
        """What the finished response says: `incomplete` when max_output_tokens cut the text."""
        return "incomplete" if self.plan.finish_reason == "length" else "completed"

    def _item_id(self, prefix: str) -> str:
        return prefix + self.id.removeprefix("resp_")

    def _summary(self) -> str:
        return " ".join(self.plan.reasoning)

    def _text(self) -> str:
        return " ".join(self.plan.content)

    def _reasoning_item(self, *, done: bool) -> dict[str, Any]:
        summary = [{"type": "summary_text", "text": self._summary()}] if done else []
        return {"id": self._item_id("rs_"), "type": "reasoning", "summary": summary}

    def _message_item(self, *, done: bool) -> dict[str, Any]:
        status = ("incomplete" if self.status == "incomplete" else "completed") if done else "in_progress"
        content = [_text_part(self._text())] if done else []
        return {
            "id": self._item_id("msg_"),
            "type": "message",
            "status": status,
            "content": content,
            "role": "assistant",
        }

    def _call_item(self, *, done: bool) -> dict[str, Any]:
        call = self.plan.tool_call
        assert call is not None
        return {
            "id": self._item_id("fc_"),
            "type": "function_call",
            "status": "completed" if done else "in_progress",
            "arguments": call.arguments if done else "",
            "call_id": call.id,
            "name": call.name,
        }

    def output(self) -> list[dict[str, Any]]:
        """The finished output items: reasoning first (when the model reasons), then the reply."""
        items = [self._reasoning_item(done=True)] if self.plan.reasoning else []
        if self.plan.tool_call is not None:
            return [*items, self._call_item(done=True)]
        return [*items, self._message_item(done=True)]

    def usage(self) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        usage = self.plan.usage
        return {
            "input_tokens": usage["prompt_tokens"],
            # Both SDK lines declare cache_write_tokens as required: sent, as 0 (the simulator caches nothing).
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": usage["total_tokens"],
        }

    def document(self, status: str | None = None) -> dict[str, Any]:
        """The `Response` object: finished (status None), or a snapshot in `status` with no output."""
        final = status is None
        document: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": CREATED,
            "status": self.status if final else status,
            "background": self.background,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if final and self.status == "incomplete" else None,
        }
        self._echo(document, _ECHOED_HEAD)
        document["output"] = self.output() if final else []
        self._echo(document, _ECHOED_TAIL)
        document["usage"] = self.usage() if final else None
        document["user"] = self.request.get("user")
        document["metadata"] = self.request.get("metadata") or {}
        return document

    def _echo(self, document: dict[str, Any], fields: tuple[tuple[str, Any], ...]) -> None:
        for name, default in fields:
            value = self.request.get(name)
            document[name] = default if value is None else value

    def events(self) -> list[tuple[bytes, float]]:
        """The SSE events of the streamed response in OpenAI's order, each with the delay before it:
        `ttft_s` before the first delta, one token delay before each further delta."""
        out = _Events(self.plan)
        out.add("response.created", response=self.document("queued" if self.background else "in_progress"))
        out.add("response.in_progress", response=self.document("in_progress"))
        index = 0
        if self.plan.reasoning:
            self._reasoning_events(out, index)
            index += 1
        if self.plan.tool_call is not None:
            self._call_events(out, index)
        else:
            self._message_events(out, index)
        out.add(f"response.{self.status}", response=self.document())
        return out.events

    def _reasoning_events(self, out: _Events, index: int) -> None:
        where: dict[str, Any] = {"item_id": self._item_id("rs_"), "output_index": index}
        out.add("response.output_item.added", output_index=index, item=self._reasoning_item(done=False))
        out.add("response.reasoning_summary_part.added", **where, summary_index=0, part=_summary_part(""))
        for i, word in enumerate(self.plan.reasoning):
            out.delta(
                "response.reasoning_summary_text.delta", **where, summary_index=0, delta=" " + word if i else word
            )
        text = self._summary()
        out.add("response.reasoning_summary_text.done", **where, summary_index=0, text=text)
        out.add("response.reasoning_summary_part.done", **where, summary_index=0, part=_summary_part(text))
        out.add("response.output_item.done", output_index=index, item=self._reasoning_item(done=True))

    def _message_events(self, out: _Events, index: int) -> None:
        where: dict[str, Any] = {"item_id": self._item_id("msg_"), "output_index": index, "content_index": 0}
        out.add("response.output_item.added", output_index=index, item=self._message_item(done=False))
        out.add("response.content_part.added", **where, part=_text_part(""))
        for i, word in enumerate(self.plan.content):
            out.delta("response.output_text.delta", **where, delta=" " + word if i else word, logprobs=[])
        text = self._text()
        out.add("response.output_text.done", **where, text=text, logprobs=[])
        out.add("response.content_part.done", **where, part=_text_part(text))
        out.add("response.output_item.done", output_index=index, item=self._message_item(done=True))

    def _call_events(self, out: _Events, index: int) -> None:
        call = self.plan.tool_call
        assert call is not None
        where: dict[str, Any] = {"item_id": self._item_id("fc_"), "output_index": index}
        out.add("response.output_item.added", output_index=index, item=self._call_item(done=False))
        for fragment in call.fragments:
            out.delta("response.function_call_arguments.delta", **where, delta=fragment)
        out.add("response.function_call_arguments.done", **where, arguments=call.arguments)
        out.add("response.output_item.done", output_index=index, item=self._call_item(done=True))


class _Events:
    """Numbers the events from 0 and spaces the deltas as chat spaces its token chunks."""

    def __init__(self, plan: _Plan) -> None:
        self.events: list[tuple[bytes, float]] = []
        self._plan = plan
        self._deltas = 0

    def add(self, type_: str, *, delay: float = 0.0, **fields: Any) -> None:
        self.events.append((sse({"type": type_, "sequence_number": len(self.events), **fields}), delay))

    def delta(self, type_: str, **fields: Any) -> None:
        delay = self._plan.token_delay_s if self._deltas else self._plan.ttft_s
        self._deltas += 1
        self.add(type_, delay=delay, **fields)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _summary_part(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}
