"""Conversations of the responses that MoA presets served through the Responses API, by response id.

A request with `previous_response_id` gives only the new input; the references still see the whole
conversation when that id is one this client served: its transcript (the conversation as chat
messages, ending with the answer) is kept here, bounded, oldest out first. Responses served by other
processes or evicted from here are unknown: the references then see the new input only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ._events import CallOutput

DEFAULT_TRANSCRIPTS = 1_000
"""Transcripts kept per client."""


class Transcripts:
    def __init__(self, limit: int = DEFAULT_TRANSCRIPTS) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            kept = self._kept.get(response_id)
            return None if kept is None else list(kept)

    def record(self, response_id: str, conversation: list[dict[str, Any]], answer: CallOutput) -> None:
        """Keep `conversation` and the `answer` to it under the id the caller was given."""
        message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
        if answer.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in answer.tool_calls
            ]
        with self._lock:
            self._kept[response_id] = [*conversation, message]
            self._kept.move_to_end(response_id)
            while len(self._kept) > self.limit:
                self._kept.popitem(last=False)
