"""One request of `moa-stream serve` sent through the wrapped client, its answer relayed as it arrives."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import openai

from ._asgi import RETRY_AFTER_S, Limits, Receive, Reply, Scope, Send, encoded, error_reply, relayed

# After the client leaves mid-stream, the relay stops at the next chunk and closes the upstream
# itself (the call ends `closed_early`, as when an SDK caller breaks off); an upstream that sends
# nothing within this time is cancelled instead.
DISCONNECT_GRACE_S = 1.0

logger = logging.getLogger("moa_stream.server")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What goes to the wrapped client: `client.get(path)` or `client.post(path, content=body)`.

    `cast_to` and `stream_cls` are the SDK's own for the endpoint; the answer is never parsed, but
    the SDK wants both, and `stream_cls` makes it hand back the response unread.
    """

    method: Literal["GET", "POST"]
    path: str
    body: bytes
    headers: dict[str, str]
    cast_to: type[Any]
    stream_cls: type[openai.AsyncStream[Any]]


class Forward:
    """One request sent through the wrapped client, its answer relayed as an ASGI response.

    Holds a concurrency slot for the whole exchange. The upstream's status, content type and bytes go
    back as they arrive; `openai.APIStatusError` goes back with the upstream's status and body. A client
    that leaves closes the upstream response (see `DISCONNECT_GRACE_S`).
    """

    def __init__(self, client: openai.AsyncOpenAI, outgoing: Outgoing, *, limits: Limits, key: str) -> None:
        # The upstream's key is the server's, not the remote caller's: an error body that echoes it
        # (some gateways do) goes back without it.
        self._upstream_key = client.api_key.encode() if len(client.api_key) >= 8 else None
        self._client = client
        self._outgoing = outgoing
        self._limits = limits
        self._key = key
        self._relaying = False
        self._peer_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._limits.try_acquire(self._key):
            refusal = error_reply(
                429,
                f"too many concurrent requests from this client (limit {self._limits.per_client})",
                code="rate_limit_exceeded",
                headers={"retry-after": str(RETRY_AFTER_S)},
            )
            await refusal.send_to(send)
            return
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._watch_peer, receive, task_group.cancel_scope)
                await self._exchange(send)
                task_group.cancel_scope.cancel()
        finally:
            self._limits.release(self._key)

    async def _watch_peer(self, receive: Receive, scope: anyio.CancelScope) -> None:
        # The body has been read: the next message is the client leaving (or the response ending).
        while (await receive())["type"] != "http.disconnect":
            pass
        self._peer_gone = True
        if self._relaying:
            await anyio.sleep(DISCONNECT_GRACE_S)
        scope.cancel()

    async def _send_upstream(self) -> openai.AsyncStream[Any]:
        out = self._outgoing
        # stream=True for the SDK: hand back the response unread, whatever the body asks for.
        if out.method == "GET":
            return await self._client.get(
                out.path,
                cast_to=out.cast_to,
                options={"headers": out.headers},
                stream=True,
                stream_cls=out.stream_cls,
            )
        return await self._client.post(
            out.path,
            cast_to=out.cast_to,
            content=out.body,
            options={"headers": out.headers},
            stream=True,
            stream_cls=out.stream_cls,
        )

    async def _exchange(self, send: Send) -> None:
        try:
            stream = await self._send_upstream()
        except openai.APIStatusError as exc:
            content = exc.response.content
            if self._upstream_key is not None:
                content = content.replace(self._upstream_key, b"[REDACTED]")
            await Reply(exc.status_code, content, headers=relayed(exc.response.headers)).send_to(send)
            return
        except openai.APITimeoutError:
            await error_reply(504, "the upstream did not answer in time", code="upstream_timeout").send_to(send)
            return
        except openai.APIConnectionError:
            await error_reply(502, "the upstream could not be reached", code="upstream_unreachable").send_to(send)
            return
        except Exception:
            logger.exception("%s %s failed before the upstream answered", self._outgoing.method, self._outgoing.path)
            await error_reply(500, "internal error in moa-stream serve").send_to(send)
            return

        response = stream.response
        chunks = response.aiter_bytes()
        try:
            start = {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": encoded(relayed(response.headers)),
            }
            await send(start)
            self._relaying = True
            async for chunk in chunks:
                if self._peer_gone:
                    break
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:  # how servers of ASGI 2.4 and later say the client has gone
                    break
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
                await stream.close()
