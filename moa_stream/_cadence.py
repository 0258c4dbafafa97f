"""Cadence: when a MoA preset reruns its references inside an agent's tool loop.

With `per_user_turn`, references run once per user message; the calls that follow in the same tool
loop (the same transcript up to its last user message, plus assistant and tool messages after it)
reuse their answers. `every_n` reruns them on every n-th call of the loop; `per_call` never reuses.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ._prompt import Reference

_encoder = msgspec.json.Encoder(order="sorted")


class CachedReferences(msgspec.Struct, frozen=True, kw_only=True):
    references: list[Reference]
    missing: list[str]
    transcript_length: int
    """Messages in the transcript the references were computed on."""


class _Entry:
    __slots__ = ("created", "uses", "value")

    def __init__(self, value: CachedReferences) -> None:
        self.value = value
        self.created = time.monotonic()
        self.uses = 1


class ReferenceCache:
    """In memory, bounded in entries and age; keyed by preset, session and the transcript up to the
    last user turn (the Redis store keeps its own, shared, see `_redis_store`)."""

    def __init__(self, *, entries: int, ttl_s: float) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._max = entries
        self._ttl = ttl_s
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str, *, every_n: int | None) -> CachedReferences | None:
        """The cached references, or None when they must be rerun (absent, expired, n-th call)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if time.monotonic() - entry.created > self._ttl or (every_n is not None and entry.uses >= every_n):
                del self._entries[key]
                return None
            entry.uses += 1
            self._entries.move_to_end(key)
            return entry.value

    async def put(self, key: str, value: CachedReferences) -> None:
        with self._lock:
            self._entries[key] = _Entry(value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)


def user_turn_key(preset: str, session_id: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """Identifies a user turn: the transcript up to and including its last user message."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    digest = hashlib.sha256(_encoder.encode(list(messages[: last_user + 1]))).hexdigest()
    return f"{preset}\x00{session_id}\x00{digest}"
