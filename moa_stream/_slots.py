"""Where a preset's slots send their calls, and how many at once.

A slot goes to the caller's own upstream unless it names a client of its own (Python) or a base URL
(the engine makes, keeps and closes one client per base URL and key variable). Reference calls in
flight are bounded per upstream origin, across every turn of the client.
"""

from __future__ import annotations

import os

import anyio
import openai

from ._presets import Slot
from ._upstream import Upstream

DEFAULT_UPSTREAM_CONCURRENCY = 16
"""Reference calls in flight at once per upstream (scheme, host and port)."""


class SlotError(Exception):
    """A slot cannot be called as configured (its API key variable is not set any more)."""


class SlotUpstreams:
    """The upstreams of slots that name their own, and a capacity limiter per upstream origin."""

    def __init__(self, *, upstream_concurrency: int = DEFAULT_UPSTREAM_CONCURRENCY) -> None:
        if upstream_concurrency < 1:
            raise ValueError(f"upstream_concurrency must be at least 1, got {upstream_concurrency!r}")
        self._concurrency = upstream_concurrency
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._own_clients: dict[tuple[str, str | None], openai.AsyncOpenAI] = {}
        self._client_upstreams: dict[int, Upstream] = {}

    def limiter(self, origin: str) -> anyio.CapacityLimiter:
        limiter = self._limiters.get(origin)
        if limiter is None:
            limiter = self._limiters[origin] = anyio.CapacityLimiter(self._concurrency)
        return limiter

    def upstream_for(self, slot: Slot, default: Upstream) -> Upstream:
        """Where `slot`'s calls go: `default` (the caller's own upstream) unless it names another."""
        client = slot.client
        if client is None and slot.base_url is not None:
            client = self._own_client(slot.base_url, slot.api_key_env)
        if client is None:
            return default
        upstream = self._client_upstreams.get(id(client))
        if upstream is None:
            upstream = self._client_upstreams[id(client)] = Upstream.of_client(client)
        return upstream

    def _own_client(self, base_url: str, key_env: str | None) -> openai.AsyncOpenAI:
        client = self._own_clients.get((base_url, key_env))
        if client is None:
            key = os.environ.get(key_env) if key_env else "none"
            if key is None:
                raise SlotError(f"environment variable {key_env} (api_key_env of the slot for {base_url}) is not set")
            client = self._own_clients[(base_url, key_env)] = openai.AsyncOpenAI(base_url=base_url, api_key=key)
        return client

    async def aclose(self) -> None:
        """Close the clients made for slots (not those users gave)."""
        with anyio.CancelScope(shield=True):
            for client in self._own_clients.values():
                await client.close()
