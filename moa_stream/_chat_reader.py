"""What the tee does with a chat-completions body: record it into the call, and give the caller the
bare SDK's bytes of it.

When usage was asked for on the caller's behalf, what that added is taken out again: the usage-only
chunk and the `"usage":null` key OpenAI then puts on every chunk. A MoA turn's usage can be rewritten
to count the whole turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._events import CallStatus
from ._meter import Call
from ._sse import data_of
from ._wire import any_decoder, json_encoder

# The `usage` key OpenAI adds to every chunk once usage is asked for, in the spellings servers use;
# the comma goes with it. A raw `"` cannot occur inside a JSON string, so these match keys only.
_NULL_USAGE = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')

UsageRewrite = Callable[[dict[str, Any]], dict[str, Any]]
"""Given the upstream's usage object, the usage object the caller should see."""

UsageLearner = Callable[[bool, bool], None]
"""Told, once a stream sent without a usage request has ended, whether a usage chunk came anyway
and whether chunks carried a `usage` key."""


class Relabel:
    """How a MoA answer speaks for its turn (see `Preset.usage`): the usage it reports (with the
    cost, where known) and, for the whole turn's usage, the preset as its model, so that no one
    prices the turn's tokens at the aggregator's rate."""

    __slots__ = ("_name", "model", "usage")

    def __init__(self, usage: UsageRewrite, model: str | None = None) -> None:
        self.usage = usage
        self.model = model
        self._name = json_encoder.encode(model)[1:-1] if model is not None else None

    def chunk(self, raw: bytes) -> bytes:
        """`raw` (an event, a chunk) naming the relabelled model, where it names one: the first
        `"model"` key's string, found in the bytes (a chunk is not decoded for it)."""
        name = self._name
        if name is None:
            return raw
        key = raw.find(b'"model"')
        if key < 0:
            return raw
        colon = raw.find(b":", key + 7)
        start = raw.find(b'"', colon + 1)
        if colon < 0 or start < 0 or raw[key + 7 : colon].strip() or raw[colon + 1 : start].strip():
            return raw
        end = raw.find(b'"', start + 1)
        if end < 0 or raw[end - 1] == 0x5C:  # a model name with an escaped quote: left as it is
            return raw
        return raw[: start + 1] + name + raw[end:]


def with_usage(document: bytes, relabel: Relabel, *, inside: str | None = None) -> bytes:
    """`document` (JSON) with its `usage` (or `<inside>.usage`) object rewritten, and its model."""
    payload = any_decoder.decode(document)
    holder = payload.get(inside) if isinstance(payload, dict) and inside is not None else payload
    if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
        holder["usage"] = relabel.usage(holder["usage"])
        if relabel.model is not None and "model" in holder:
            holder["model"] = relabel.model
        return json_encoder.encode(payload)
    return relabel.chunk(document)


def _without_null_usage(raw: bytes) -> bytes:
    for spelling in _NULL_USAGE:
        found = raw.find(spelling)
        if found >= 0:
            return raw[:found] + raw[found + len(spelling) :]
    return raw


class ChatReader:
    """Reads a chat-completions body (SSE chunks or a whole completion) into `call`."""

    __slots__ = (
        "_call",
        "_drop_null_usage",
        "_learn_usage",
        "_rewrite_usage",
        "_saw_usage_key",
        "_strip_usage",
        "done",
    )

    def __init__(
        self,
        call: Call,
        *,
        strip_usage: bool = False,
        drop_null_usage: bool = False,
        rewrite_usage: Relabel | None = None,
        learn_usage: UsageLearner | None = None,
    ) -> None:
        self._call = call
        self._strip_usage = strip_usage
        """Drop usage-only chunks: they came because we asked, and the caller did not."""
        self._drop_null_usage = drop_null_usage
        """Take the `usage: null` key out of chunks: it came because we asked."""
        self._rewrite_usage = rewrite_usage
        self._learn_usage = learn_usage
        self._saw_usage_key = False
        self.done = False
        """The stream said it is whole (`[DONE]`, or the end of the body)."""

    @property
    def holds_body(self) -> bool:
        """A whole body is held back until it has arrived (its usage is rewritten)."""
        return self._rewrite_usage is not None

    def event(self, block: bytes) -> bytes:
        """Record one SSE event; return what the caller gets of it (b"" when it is stripped).

        Whatever the event holds, this never raises: the caller's SDK judges the bytes it gets."""
        data = data_of(block)
        if data is None:  # comments, keep-alives
            return block
        if data.startswith(b"[DONE]"):
            self.ended()
            return block
        call = self._call
        buffer = call.buffer
        outputs = buffer.output_chunks
        try:
            chunk = buffer.add_chunk_json(data)
        except Exception as exc:  # a parser bug must not break the caller's stream: record it, pass the bytes on
            buffer.error = buffer.error or f"unreadable stream chunk: {type(exc).__name__}: {exc}"
            return block
        if buffer.output_chunks != outputs and call.ttft_s is None:
            call.first_output()
        if self._learn_usage is not None and not self._saw_usage_key:
            self._saw_usage_key = b'"usage"' in data
        relabel = self._rewrite_usage
        if chunk is None or chunk.usage is None:
            out = _without_null_usage(block) if self._drop_null_usage else block
            return out if relabel is None else relabel.chunk(out)
        if self._strip_usage and not chunk.choices:
            return b""
        if relabel is not None:
            return b"data: " + with_usage(data, relabel) + b"\n\n"
        return block

    def ended(self) -> None:
        """[DONE] or the end of the body: what a stream sent without a usage request showed about
        the upstream is now known."""
        self.done = True
        learn, self._learn_usage = self._learn_usage, None
        buffer = self._call.buffer
        if learn is not None and buffer.finish_reason is not None:
            learn(buffer.usage is not None, self._saw_usage_key)

    def answered(self) -> bool:
        """The model finished its answer (its usage may still follow)."""
        return self._call.buffer.finish_reason is not None

    def body(self, body: bytes, http_status: int) -> None:
        self._call.buffer.add_body(body, http_status=http_status)
        self.done = True

    def rewrite_body(self, body: bytes) -> bytes:
        return body if self._rewrite_usage is None else with_usage(body, self._rewrite_usage)

    def end_status(self) -> tuple[CallStatus, str | None] | None:
        """How the call ends when its body ended by itself."""
        return ("error", None) if self._call.buffer.error else ("completed", None)
