"""Clients of the Redis store (redis-py, the `redis` extra, imported only here and by the store)."""

from __future__ import annotations

from typing import Any

from ._store import StoreConfig


def connect(config: StoreConfig, *, blocking: bool = False) -> Any:
    """An asyncio client (the data path's), or a blocking one (the synchronous public functions').

    A pooled connection that a restarted Redis closed fails its next command: one retry on a fresh
    connection. That is safe because every script is idempotent (a reservation by its holds' call
    ids, a settlement by its call id)."""
    import redis
    import redis.asyncio
    from redis.backoff import NoBackoff

    if blocking:
        from redis.retry import Retry

        retry: Any = Retry(NoBackoff(), 1)
        make: Any = redis.Redis.from_url
    else:
        from redis.asyncio.retry import Retry as AsyncRetry

        retry = AsyncRetry(NoBackoff(), 1)
        make = redis.asyncio.Redis.from_url
    return make(
        config.url,
        socket_timeout=config.timeout_s,
        socket_connect_timeout=config.timeout_s,
        retry=retry,
        retry_on_error=[redis.exceptions.ConnectionError],
    )
