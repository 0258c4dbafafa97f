"""The MoA reference cache in Redis: a tool loop whose next call lands on another replica reuses
the references the first one ran. A cache that cannot answer is a miss, never an error."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ._cadence import CachedReferences
from ._redis_keys import FORMAT, Keys, decode_value

logger = logging.getLogger("moa_stream")

_encoder = msgspec.json.Encoder()
_references_decoder = msgspec.json.Decoder(CachedReferences)

Run = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
"""The store's way to run a Redis command on its own loop, bounded in time."""


class SharedReferences:
    """One preset's cached references, keyed by session and user turn (see `_cadence`)."""

    def __init__(self, run: Run, get_script: Any, put_script: Any, keys: Keys, *, preset: str, ttl_s: float) -> None:
        self._run = run
        self._get = get_script
        self._put = put_script
        self._keys = keys
        self._preset = preset
        self._ttl_ms = max(1, int(ttl_s * 1000))

    async def get(self, key: str, *, every_n: int | None) -> CachedReferences | None:
        entry = self._keys.cache(self._preset, key)
        try:
            raw = await self._run(lambda: self._get(keys=[entry], args=[every_n or 0]))
        except Exception as exc:
            logger.warning("moa_stream: reference cache unavailable (%s)", exc)
            return None
        if raw is None:
            return None
        return _references_decoder.decode(_encoder.encode(decode_value(raw, entry)["value"]))

    async def put(self, key: str, value: CachedReferences) -> None:
        entry = self._keys.cache(self._preset, key)
        data = _encoder.encode({"v": FORMAT, "value": value})
        try:
            await self._run(lambda: self._put(keys=[entry], args=[data, self._ttl_ms]))
        except Exception as exc:
            logger.warning("moa_stream: reference cache unavailable (%s)", exc)
