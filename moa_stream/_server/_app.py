"""The app of `moa-stream serve`: chat requests forwarded through one wrapped client, the answer
relayed as the upstream sent it, and the presets listed beside the upstream's models."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import msgspec
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .._errors import error_json
from .._moa import MOA_PREFIX
from .._sdk import find_engine
from .._session import SESSION_HEADER
from .._wire import any_decoder, json_encoder
from ._asgi import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_PER_CLIENT,
    RETRY_AFTER_S,
    Limits,
    Receive,
    Reply,
    Scope,
    Send,
    encoded,
    error_reply,
    relayed,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request

# After the client leaves mid-stream, the relay stops at the next chunk and closes the upstream
# itself (the call ends `closed_early`, as when an SDK caller breaks off); an upstream that sends
# nothing within this time is cancelled instead.
_DISCONNECT_GRACE_S = 1.0
# On shutdown, after uvicorn has finished or cancelled the open responses: how long to wait for
# them to unwind before the client is closed (which drains events and trace lines).
_UNWIND_S = 5.0

logger = logging.getLogger("moa_stream.server")


class _Forward:
    """One chat request sent through the wrapped client, its answer relayed as an ASGI response.

    Holds a concurrency slot for the whole exchange. The upstream's status, content type and bytes go
    back as they arrive; `openai.APIStatusError` goes back with the upstream's status and body. A client
    that leaves closes the upstream response (see `_DISCONNECT_GRACE_S`).
    """

    def __init__(
        self, client: openai.AsyncOpenAI, body: bytes, headers: dict[str, str], *, limits: Limits, key: str
    ) -> None:
        # The upstream's key is the server's, not the remote caller's: an error body that echoes it
        # (some gateways do) goes back without it.
        self._upstream_key = client.api_key.encode() if len(client.api_key) >= 8 else None
        self._client = client
        self._body = body
        self._headers = headers
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
            await anyio.sleep(_DISCONNECT_GRACE_S)
        scope.cancel()

    async def _exchange(self, send: Send) -> None:
        try:
            stream = await self._client.post(
                "/chat/completions",
                cast_to=ChatCompletion,
                content=self._body,
                options={"headers": self._headers},
                stream=True,  # for the SDK: hand back the response unread, whatever the body asks for
                stream_cls=openai.AsyncStream[ChatCompletionChunk],
            )
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
            logger.exception("chat request failed before the upstream answered")
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


class _Endpoints:
    """The route handlers, around one wrapped client."""

    def __init__(self, client: openai.AsyncOpenAI, *, token: str | None, max_body_bytes: int, limits: Limits) -> None:
        self.client = client
        self.presets = preset_names(client)
        self.limits = limits
        self._max_body_bytes = max_body_bytes
        self._token: bytes | None = None
        self._token_key: str | None = None
        if token is not None:
            self._token = token.encode("utf-8")
            # The limiter's key for token holders: a digest, so the token itself is kept only once.
            self._token_key = "token:" + hashlib.sha256(self._token).hexdigest()[:16]

    def _refusal(self, request: Request) -> Reply | None:
        if self._token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Starlette decodes header values as latin-1: encoding back gives the bytes that were sent.
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self._token):
            return None
        return error_reply(
            401, "missing or invalid bearer token", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
        )

    def _client_key(self, request: Request) -> str:
        # Without a server token, a client's Authorization header is its own choice, so it cannot
        # name the client; the peer's address (not port: one client opens many connections) does.
        if self._token_key is not None:
            return self._token_key
        return f"peer:{request.client.host}" if request.client is not None else "peer:unknown"

    async def _read_body(self, request: Request) -> bytes | Reply:
        too_large = error_reply(
            413, f"request body is larger than {self._max_body_bytes} bytes", code="request_too_large"
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body_bytes:
            return too_large
        body = bytearray()
        while True:  # the ASGI messages themselves: a declared length is not what arrives
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return Reply(499, b"")  # nginx's "client closed request"; nobody is left to read it
            body += message.get("body", b"")
            if len(body) > self._max_body_bytes:
                return too_large
            if not message.get("more_body", False):
                return bytes(body)

    async def chat_completions(self, request: Request) -> Reply | _Forward:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        body = await self._read_body(request)
        if isinstance(body, Reply):
            return body
        try:
            payload = any_decoder.decode(body)
        except msgspec.DecodeError as exc:
            return error_reply(400, f"the request body is not valid JSON: {exc}")
        except UnicodeDecodeError as exc:  # msgspec's error for a string that is not UTF-8
            return error_reply(
                400, f"the request body is not valid JSON: invalid UTF-8 at byte {exc.start} ({exc.reason})"
            )
        problem = _problem(payload)
        if problem is not None:
            message, param = problem
            return error_reply(400, message, param=param)
        headers = {"content-type": "application/json"}
        session_id = request.headers.get(SESSION_HEADER)
        if session_id:
            headers[SESSION_HEADER] = session_id  # the library reads it and removes it before upstream
        return _Forward(self.client, body, headers, limits=self.limits, key=self._client_key(request))

    async def models(self, request: Request) -> Reply:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        data: list[dict[str, object]] = [
            {"id": f"{MOA_PREFIX}{name}", "object": "model", "created": 0, "owned_by": "moa-stream"}
            for name in self.presets
        ]
        try:
            async for model in self.client.models.list():
                data.append(model.to_dict())
        except openai.APIError as exc:  # an upstream that lists no models, or is down: the presets alone
            logger.debug("upstream model list unavailable: %s", type(exc).__name__)
        return Reply(200, json_encoder.encode({"object": "list", "data": data}))


def preset_names(client: openai.AsyncOpenAI) -> list[str]:
    """The presets of a wrapped client (ValueError for a client that is not wrapped)."""
    engine = find_engine(client)
    if engine is None:
        raise ValueError(
            f"create_app() needs a client returned by moa_stream.wrap(), got an unwrapped {type(client).__qualname__}"
        )
    return sorted(engine.presets)


def _problem(payload: object) -> tuple[str, str | None] | None:
    """What makes `payload` no chat request at all (message, param), or None. The rest is the upstream's to judge."""
    if not isinstance(payload, dict):
        return f"the request body must be a JSON object, got {type(payload).__name__}", None
    if "model" not in payload:
        return "you must provide a model parameter", "model"
    if not isinstance(payload["model"], str) or not payload["model"]:
        return "'model' must be a non-empty string", "model"
    if "messages" not in payload:
        return "you must provide a messages parameter", "messages"
    if not isinstance(payload["messages"], list):
        return "'messages' must be an array of messages", "messages"
    return None


def create_app(
    client: openai.AsyncOpenAI,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrent_per_client: int = DEFAULT_MAX_CONCURRENT_PER_CLIENT,
) -> Starlette:
    """An ASGI app serving `/v1/chat/completions` and `/v1/models` through `client` (from `wrap()`).

    With `token`, every request needs `Authorization: Bearer <token>` (401 otherwise). Bodies over
    `max_body_bytes` are a 413, malformed ones a 400, and more than `max_concurrent_per_client` chat
    requests in flight from one client (its token, else its address) a 429 with `retry-after`. Errors
    are in OpenAI's JSON shape. The app owns `client`: its lifespan's end closes it, which drains
    pending events and trace lines.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    if token is not None and not token:
        raise ValueError("create_app() token must be a non-empty string or None")
    if max_body_bytes < 1:
        raise ValueError(f"create_app() max_body_bytes must be at least 1, got {max_body_bytes!r}")
    if max_concurrent_per_client < 1:
        raise ValueError(
            f"create_app() max_concurrent_per_client must be at least 1, got {max_concurrent_per_client!r}"
        )
    limits = Limits(max_concurrent_per_client)
    endpoints = _Endpoints(client, token=token, max_body_bytes=max_body_bytes, limits=limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(_UNWIND_S):
                    await limits.wait_idle()
                await client.close()

    async def route_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        headers = exc.headers if isinstance(exc, HTTPException) else None
        return Response(error_json(status, message), status, headers=headers, media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"]),
            Route("/v1/models", endpoints.models, methods=["GET"]),
        ],
        exception_handlers={HTTPException: route_error},
        lifespan=lifespan,
    )
