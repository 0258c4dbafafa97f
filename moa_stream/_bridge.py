"""A chat completion answered as a Responses API response: the bridge for aggregators whose upstream
has no `/responses`.

The chat stream is read as it comes (through the tee, so the aggregator's call is metered as the
chat call it is) and written out as the event sequence the Responses API sends and the openai SDK's
`responses.stream()` checks: `response.created`, `response.in_progress`, for each output item its
`added`, deltas and `done` events (reasoning summary, message text, function-call arguments), then
one terminal event (`response.completed`, or `response.incomplete` when the model ran out of tokens)
with the whole response and its usage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ._chat_reader import Relabel
from ._sse import SSEFramer, data_of
from ._wire import WireChunk, WireUsage, chunk_decoder, completion_decoder, error_message

_encoder = msgspec.json.Encoder()


def responses_usage(usage: WireUsage | None) -> dict[str, Any] | None:
    """Chat usage in the Responses API's terms."""
    if usage is None or usage.prompt_tokens is None or usage.completion_tokens is None:
        return None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else None
    reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached or 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning or 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponseBuilder:
    """The Responses API's view of one chat completion, built as its chunks (or its body) arrive."""

    def __init__(self, response_id: str, model: str, payload: dict[str, Any], rewrite: Relabel | None) -> None:
        self.id = response_id
        self.model = model
        self._payload = payload
        self._rewrite = rewrite
        self._created = int(time.time())
        self._sequence = 0
        self._items: list[dict[str, Any]] = []
        self._open: dict[str, int] = {}  # "reasoning", "message", "call:<chat index>" -> output index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    # -- events ----------------------------------------------------------------------------------

    def start(self) -> bytes:
        snapshot = self.response("in_progress")
        return self._event("response.created", response=snapshot) + self._event(
            "response.in_progress", response=snapshot
        )

    def chunk(self, chunk: WireChunk) -> bytes:
        out = []
        if chunk.usage is not None:
            self.usage = responses_usage(chunk.usage)
        choice = next((c for c in chunk.choices or () if c.index == 0), None)
        delta = choice.delta if choice is not None else None
        if delta is not None:
            reasoning = delta.reasoning_content or delta.reasoning
            if reasoning:
                out.append(self._text("reasoning", reasoning))
            if delta.content:
                out.append(self._text("message", delta.content))
            for position, call in enumerate(delta.tool_calls or ()):
                out.append(self._call_delta(call.index if call.index is not None else position, call))
        if choice is not None and choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason
        return b"".join(out)

    def finish(self) -> bytes:
        """Close every open item, then the terminal event."""
        out = [self._close(key) for key in list(self._open)]
        incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(self.finish_reason or "")
        if incomplete is not None:
            out.append(self._event("response.incomplete", response=self.response("incomplete", reason=incomplete)))
        else:
            out.append(self._event("response.completed", response=self.response("completed")))
        return b"".join(out)

    def error(self, message: str) -> bytes:
        return self._event("error", code="upstream_error", message=message, param=None)

    def _text(self, kind: str, text: str) -> bytes:
        out = b""
        if kind not in self._open:
            out += self._open_item(kind)
        index = self._open[kind]
        item = self._items[index]
        if kind == "message":
            item["content"][0]["text"] += text
            return out + self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        item["summary"][0]["text"] += text
        return out + self._event(
            "response.reasoning_summary_text.delta", item_id=item["id"], output_index=index, summary_index=0, delta=text
        )

    def _call_delta(self, chat_index: int, call: Any) -> bytes:
        key = f"call:{chat_index}"
        out = b""
        if key not in self._open:
            for other in [k for k in self._open if not k.startswith("call:")]:
                out += self._close(other)  # the text before the calls is whole
            out += self._open_item(key, call_id=call.id or "", name=call.function.name if call.function else "")
        index = self._open[key]
        item = self._items[index]
        arguments = call.function.arguments if call.function else None
        if not arguments:
            return out
        item["arguments"] += arguments
        return out + self._event(
            "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=arguments
        )

    def _open_item(self, key: str, *, call_id: str = "", name: str = "") -> bytes:
        index = len(self._items)
        if key == "message":
            item: dict[str, Any] = {"id": f"msg_{self.id}_{index}", "type": "message", "status": "in_progress"}
            item |= {"role": "assistant", "content": []}
        elif key == "reasoning":
            item = {"id": f"rs_{self.id}_{index}", "type": "reasoning", "summary": []}
        else:
            item = {"id": f"fc_{self.id}_{index}", "type": "function_call", "status": "in_progress"}
            item |= {"call_id": call_id, "name": name, "arguments": ""}
        self._items.append(item)
        self._open[key] = index
        out = self._event(
            "response.output_item.added",
            output_index=index,
            item=dict(item, content=[]) if key == "message" else dict(item),
        )
        if key == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(dict(part))
            out += self._event(
                "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
            )
        elif key == "reasoning":
            item["summary"].append({"type": "summary_text", "text": ""})
            part = {"type": "summary_text", "text": ""}
            out += self._event(
                "response.reasoning_summary_part.added",
                item_id=item["id"],
                output_index=index,
                summary_index=0,
                part=part,
            )
        return out

    def _close(self, key: str) -> bytes:
        index = self._open.pop(key)
        item = self._items[index]
        out = b""
        if item["type"] == "message":
            part = item["content"][0]
            out += self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            )
            out += self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
            )
            item["status"] = "completed"
        elif item["type"] == "reasoning":
            text = item["summary"][0]["text"]
            fields = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            out += self._event("response.reasoning_summary_text.done", text=text, **fields)
            out += self._event(
                "response.reasoning_summary_part.done", part={"type": "summary_text", "text": text}, **fields
            )
        else:
            out += self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
                name=item["name"],
            )
            item["status"] = "completed"
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def _event(self, kind: str, **fields: Any) -> bytes:
        document = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(document) + b"\n\n"

    # -- the response object ---------------------------------------------------------------------

    def response(self, status: str, *, reason: str | None = None) -> dict[str, Any]:
        payload = self._payload
        finished = status in ("completed", "incomplete")
        usage = self.usage if finished else None
        if usage is not None and self._rewrite is not None:
            usage = self._rewrite.usage(usage)
        return {
            "id": self.id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None if reason is None else {"reason": reason},
            "instructions": payload.get("instructions"),
            "max_output_tokens": payload.get("max_output_tokens"),
            "model": self.model,
            "output": list(self._items) if finished else [],
            "parallel_tool_calls": payload.get("parallel_tool_calls", True),
            "previous_response_id": payload.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": payload.get("store", True),
            "temperature": payload.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": payload.get("tool_choice", "auto"),
            "tools": payload.get("tools", []),
            "top_p": payload.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": payload.get("metadata") or {},
        }

    def whole(self, body: bytes) -> bytes:
        """A chat completion's body as a Response object (non-streamed)."""
        completion = completion_decoder.decode(body)
        self.usage = responses_usage(completion.usage)
        choice = next((c for c in completion.choices or () if c.index == 0), None)
        message = choice.message if choice is not None else None
        if message is not None:
            reasoning = message.reasoning_content or message.reasoning
            if reasoning:
                self._text("reasoning", reasoning)
            if message.content:
                self._text("message", message.content)
            for position, call in enumerate(message.tool_calls or ()):
                self._call_delta(position, call)
        self.finish_reason = choice.finish_reason if choice is not None else None
        for key in list(self._open):
            self._close(key)
        incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(self.finish_reason or "")
        status = "incomplete" if incomplete else "completed"
        return _encoder.encode(self.response(status, reason=incomplete))


class BridgeStream:
    """The Responses event stream of a (teed) chat-completions event stream."""

    def __init__(self, chat: Any, builder: ResponseBuilder) -> None:
        self._chat = chat
        self._builder = builder

    async def __aiter__(self) -> AsyncIterator[bytes]:
        builder = self._builder
        framer = SSEFramer()
        yield builder.start()
        async for data in self._chat:
            out: list[bytes] = []
            for block in framer.feed(data)[1]:
                payload = data_of(block)
                if payload is None or payload.startswith(b"[DONE]"):
                    continue
                try:
                    chunk = chunk_decoder.decode(payload)
                except (msgspec.DecodeError, UnicodeDecodeError):
                    continue  # the chat call records it as an error; nothing to say in Responses terms
                if chunk.error is not None:
                    yield b"".join(out) + builder.error(error_message(chunk.error))
                    return
                out.append(builder.chunk(chunk))
            if out:
                yield b"".join(out)
        yield builder.finish()

    async def aclose(self) -> None:
        await self._chat.aclose()
