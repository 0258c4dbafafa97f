"""What the tee does with a Responses API body: record it into the call, and pass it on as it came
(the Responses API always reports usage in its terminal event: nothing is asked on the caller's
behalf, so nothing is taken out). A MoA turn's usage can be rewritten to count the whole turn."""

from __future__ import annotations

from ._chat_reader import Relabel, with_usage
from ._events import CallStatus
from ._meter import Call
from ._responses_wire import TERMINAL, add_event, add_response_body, event_type, finished
from ._sse import fields


class ResponsesReader:
    """Reads a Responses body (typed SSE events or a whole Response object) into `call`."""

    __slots__ = ("_call", "_rewrite_usage", "done", "pending")

    def __init__(self, call: Call, *, rewrite_usage: Relabel | None = None) -> None:
        self._call = call
        self._rewrite_usage = rewrite_usage
        self.done = False
        """A terminal event arrived (`response.completed`, `.incomplete`, `.failed`)."""
        self.pending: str | None = None
        """The id of a background response whose body said it is not finished yet."""

    @property
    def holds_body(self) -> bool:
        return self._rewrite_usage is not None

    def event(self, block: bytes) -> bytes:
        """Record one SSE event; return what the caller gets of it. Never raises."""
        name, data = fields(block)
        if data is None or data.startswith(b"[DONE]"):  # some gateways end Responses streams as chat's
            return block
        call = self._call
        buffer = call.buffer
        try:
            kind = event_type(name, data)
            if kind is None:
                return block
            if add_event(buffer, kind, data) and call.ttft_s is None:
                call.first_output()
        except Exception as exc:  # never break the caller's stream: record it, pass the bytes on
            buffer.error = buffer.error or f"unreadable stream event: {type(exc).__name__}: {exc}"
            return block
        relabel = self._rewrite_usage
        if kind in TERMINAL:
            self.done = True
            if relabel is not None:
                head = block[: block.index(b"data:")]
                return head + b"data: " + with_usage(data, relabel, inside="response") + b"\n\n"
        return block if relabel is None else relabel.chunk(block)

    def ended(self) -> None:
        pass  # nothing to learn: usage is never asked for

    def answered(self) -> bool:
        """An output item is finished: the terminal event (with the usage) may still follow."""
        return self.done or self._call.buffer.item_done

    def body(self, body: bytes, http_status: int) -> None:
        buffer = self._call.buffer
        if http_status >= 400:
            buffer.add_body(body, http_status=http_status)  # the error text, as for chat
            return
        response = add_response_body(buffer, body)
        self.done = response is not None and finished(response)
        if response is not None and not self.done and response.background and response.id:
            self.pending = response.id

    def rewrite_body(self, body: bytes) -> bytes:
        return body if self._rewrite_usage is None else with_usage(body, self._rewrite_usage)

    def end_status(self) -> tuple[CallStatus, str | None] | None:
        """How the call ends when its body ended by itself; None for a background response that is
        not finished (its call stays open until a terminal status is seen)."""
        if self.pending is not None:
            return None
        if self._call.buffer.error:
            return "error", None
        if not self.done:
            return "error", "the stream ended before its terminal event"
        return "completed", None
