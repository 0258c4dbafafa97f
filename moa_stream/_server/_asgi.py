"""ASGI building blocks of `moa-stream serve`: whole replies, errors in OpenAI's shape, the
per-client concurrency limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import anyio

from .._errors import error_json

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""Largest request body accepted (1 MiB); a larger one is a 413."""
DEFAULT_MAX_CONCURRENT_PER_CLIENT = 8
"""Forwarded requests in flight per client (its key or token, else its address); one more is a 429."""
DEFAULT_GRACEFUL_TIMEOUT = 30
"""On shutdown, how many seconds open responses may run on before uvicorn cancels them."""

RETRY_AFTER_S = 1
# Upstream response headers worth relaying; the rest describe the upstream's connection, not ours.
_RELAYED_HEADERS = ("content-type", "x-request-id", "retry-after", "x-moa-error")
"""`x-moa-error` marks a budget refusal: a caller's own wrapped client raises `BudgetExceeded` for it."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Reply:
    """A whole response (status, headers, body) as an ASGI app; JSON unless `headers` say otherwise."""

    def __init__(self, status: int, body: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = encoded({"content-type": "application/json", **(headers or {})})
        self.headers.append((b"content-length", str(len(body)).encode("ascii")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.send_to(send)

    async def send_to(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def error_reply(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    return Reply(status, error_json(status, message, param=param, code=code), headers=headers)


def relayed(headers: Any) -> dict[str, str]:
    """The upstream response headers that the caller gets too."""
    return {name: headers[name] for name in _RELAYED_HEADERS if name in headers}


def encoded(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class Limits:
    """Forwarded requests in flight, per client key; never holds a key with nothing in flight."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._active: dict[str, int] = {}
        self._total = 0
        self._idle: anyio.Event | None = None

    def try_acquire(self, key: str) -> bool:
        active = self._active.get(key, 0)
        if active >= self.per_client:
            return False
        self._active[key] = active + 1
        self._total += 1
        return True

    def release(self, key: str) -> None:
        active = self._active.pop(key) - 1
        if active:
            self._active[key] = active
        self._total -= 1
        if not self._total and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        if self._total:
            self._idle = anyio.Event()
            await self._idle.wait()
