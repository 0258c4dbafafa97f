"""The app of `moa-stream serve`: chat and Responses requests forwarded through one wrapped client, the
answer relayed as the upstream sent it, the presets listed beside the upstream's models, and `/health`."""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
import msgspec
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from .._errors import error_json
from .._moa import MOA_PREFIX
from .._sdk import find_engine
from .._session import KEY_HEADER, SESSION_HEADER
from .._version import __version__
from .._wire import any_decoder, json_encoder
from .._wrap import _engine_of
from ._asgi import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENT_PER_CLIENT, Limits, Reply, error_reply
from ._forward import Forward, Outgoing
from ._keys import DEFAULT_SESSION, KeyRing

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request

# On shutdown, after uvicorn has finished or cancelled the open responses: how long to wait for
# them to unwind before the client is closed (which drains events and trace lines).
_UNWIND_S = 5.0

logger = logging.getLogger("moa_stream.server")

# The SDK's types for each endpoint (see `Outgoing`).
_CHAT = (ChatCompletion, openai.AsyncStream[ChatCompletionChunk])
_RESPONSES = (Response, openai.AsyncStream[ResponseStreamEvent])
# Path segments an HTTP client would resolve away, sending the request somewhere else upstream.
_DOT_SEGMENTS = frozenset({".", ".."})


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who sent a request: `limit_key` names it for the per-client limit; `key_id` namespaces its
    sessions (None keeps the session id the client sent)."""

    limit_key: str
    key_id: str | None


class _Endpoints:
    """The route handlers, around one wrapped client."""

    def __init__(
        self, client: openai.AsyncOpenAI, *, keys: KeyRing | None, namespaced: bool, max_body_bytes: int, limits: Limits
    ) -> None:
        self.client = client
        self.presets = preset_names(client)
        self.limits = limits
        # Known at construction and never changing: /health answers from memory, without a round trip.
        self._health = json_encoder.encode(
            {"status": "ok", "version": __version__, "store": "shared" if _engine_of(client).shared_store else "memory"}
        )
        self._max_body_bytes = max_body_bytes
        self._keys = keys
        self._namespaced = namespaced

    def _caller(self, request: Request) -> _Caller | Reply:
        """Who sent `request` (its key, when the server has keys), or the 401 refusing it."""
        if self._keys is None:
            # Without server keys, a client's Authorization header is its own choice, so it cannot
            # name the client; the peer's address (not port: one client opens many connections) does.
            peer = request.client.host if request.client is not None else "unknown"
            return _Caller(f"peer:{peer}", None)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Starlette decodes header values as latin-1: encoding back gives the bytes that were sent.
        key_id = self._keys.match(given.strip().encode("latin-1")) if scheme.lower() == "bearer" else None
        if key_id is None:
            return error_reply(
                401, "missing or invalid bearer token", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
            )
        return _Caller(f"key:{key_id}", key_id if self._namespaced else None)

    def _session_headers(self, request: Request, caller: _Caller) -> dict[str, str]:
        """The session (and key) headers for the library: a key's sessions are `<key id>.<session>`,
        so that no key reaches another's sessions, whatever session id its clients send."""
        session_id = request.headers.get(SESSION_HEADER)
        if caller.key_id is None:
            return {SESSION_HEADER: session_id} if session_id else {}
        return {SESSION_HEADER: f"{caller.key_id}.{session_id or DEFAULT_SESSION}", KEY_HEADER: caller.key_id}

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

    async def chat_completions(self, request: Request) -> Reply | Forward:
        return await self._create(request, "/chat/completions", _chat_problem, _CHAT)

    async def responses(self, request: Request) -> Reply | Forward:
        return await self._create(request, "/responses", _responses_problem, _RESPONSES)

    async def retrieve_response(self, request: Request) -> Reply | Forward:
        return await self._look(request, "GET", "")

    async def cancel_response(self, request: Request) -> Reply | Forward:
        return await self._look(request, "POST", "/cancel")

    async def _create(
        self, request: Request, path: str, problem_of: _Check, types: tuple[type[Any], type[openai.AsyncStream[Any]]]
    ) -> Reply | Forward:
        """A request that makes a call: its body goes upstream as it arrived, once it is one at all."""
        caller = self._caller(request)
        if isinstance(caller, Reply):
            return caller
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
        problem = _problem(payload, problem_of)
        if problem is not None:
            message, param = problem
            return error_reply(400, message, param=param)
        # The library reads the session and key headers and removes them before upstream.
        headers = {"content-type": "application/json", **self._session_headers(request, caller)}
        return self._forward(caller, Outgoing("POST", path, body, headers, *types))

    async def _look(self, request: Request, method: Literal["GET", "POST"], suffix: str) -> Reply | Forward:
        """A retrieve or cancel of a stored response: relayed with its query (`?stream=true` resumes a
        background response's events), so the library sees a background response finish."""
        caller = self._caller(request)
        if isinstance(caller, Reply):
            return caller
        # Read even when empty: the relay takes the next message for the client leaving.
        body = await self._read_body(request)
        if isinstance(body, Reply):
            return body
        response_id: str = request.path_params["response_id"]
        if response_id in _DOT_SEGMENTS:
            return error_reply(404, f"Response with id {response_id!r} not found.")
        path = f"/responses/{urllib.parse.quote(response_id, safe='')}{suffix}"
        if request.url.query:
            path += f"?{request.url.query}"
        return self._forward(caller, Outgoing(method, path, body, {}, *_RESPONSES))

    def _forward(self, caller: _Caller, outgoing: Outgoing) -> Forward:
        return Forward(self.client, outgoing, limits=self.limits, key=caller.limit_key)

    async def health(self, request: Request) -> Reply:
        """200 while the server serves: for load balancers and orchestrators, so no token is asked for
        and nothing is sent upstream or to the store (their outages show on the calls themselves)."""
        return Reply(200, self._health, headers={"cache-control": "no-store"})

    async def models(self, request: Request) -> Reply:
        caller = self._caller(request)
        if isinstance(caller, Reply):
            return caller
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


_Problem = tuple[str, str | None]
"""What makes a body no request of its endpoint: (message, param)."""
_Check = Callable[[dict[str, Any]], _Problem | None]


def _problem(payload: object, problem_of: _Check) -> _Problem | None:
    """What makes `payload` no request at all, or None. The rest is the upstream's to judge."""
    if not isinstance(payload, dict):
        return f"the request body must be a JSON object, got {type(payload).__name__}", None
    return problem_of(payload)


def _model_problem(payload: dict[str, Any]) -> _Problem | None:
    if not isinstance(payload["model"], str) or not payload["model"]:
        return "'model' must be a non-empty string", "model"
    return None


def _chat_problem(payload: dict[str, Any]) -> _Problem | None:
    if "model" not in payload:
        return "you must provide a model parameter", "model"
    if problem := _model_problem(payload):
        return problem
    if "messages" not in payload:
        return "you must provide a messages parameter", "messages"
    if not isinstance(payload["messages"], list):
        return "'messages' must be an array of messages", "messages"
    return None


def _responses_problem(payload: dict[str, Any]) -> _Problem | None:
    # Every field of a Responses create is optional (a stored `prompt` may name the model, a `conversation`
    # or `previous_response_id` carry the input): the upstream judges, only a model to route by is checked.
    return None if payload.get("model") is None else _model_problem(payload)


def create_app(
    client: openai.AsyncOpenAI,
    *,
    token: str | None = None,
    keys: KeyRing | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrent_per_client: int = DEFAULT_MAX_CONCURRENT_PER_CLIENT,
) -> Starlette:
    """An ASGI app serving `/v1/chat/completions`, `/v1/responses` (create, and retrieve and cancel by id)
    and `/v1/models` through `client` (from `wrap()`), and `GET /health`: 200 with
    `{"status": "ok", "version": ..., "store": "memory" | "shared"}`, without a token.

    With `token`, every request needs `Authorization: Bearer <token>` (401 otherwise). With `keys` instead,
    it needs the token of one of the ring's keys: the request's session `s` (its `X-MoA-Session`, else
    `default`) becomes `<key id>.s`, the key's budget applies to all of its sessions, and a key gone
    after `keys.reload()` is refused from then on. Bodies over `max_body_bytes` are a 413, malformed
    ones a 400, and more than `max_concurrent_per_client` forwarded requests in flight from one client
    (its key, else its address) a 429 with `retry-after`.
    Errors are in OpenAI's JSON shape. The app owns `client`: its lifespan's end closes it, which drains
    pending events and trace lines.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    if token is not None and not token:
        raise ValueError("create_app() token must be a non-empty string or None")
    if token is not None and keys is not None:
        raise ValueError("create_app() takes a token or keys, not both")
    if max_body_bytes < 1:
        raise ValueError(f"create_app() max_body_bytes must be at least 1, got {max_body_bytes!r}")
    if max_concurrent_per_client < 1:
        raise ValueError(
            f"create_app() max_concurrent_per_client must be at least 1, got {max_concurrent_per_client!r}"
        )
    limits = Limits(max_concurrent_per_client)
    # One token is the one-key case, its sessions named as the clients name them, as before keys.
    ring = KeyRing.of_token(token) if token is not None else keys
    endpoints = _Endpoints(client, keys=ring, namespaced=keys is not None, max_body_bytes=max_body_bytes, limits=limits)
    if keys is not None:
        keys.attach(_engine_of(client))

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
            Route("/v1/responses", endpoints.responses, methods=["POST"]),
            Route("/v1/responses/{response_id}", endpoints.retrieve_response, methods=["GET"]),
            Route("/v1/responses/{response_id}/cancel", endpoints.cancel_response, methods=["POST"]),
            Route("/v1/models", endpoints.models, methods=["GET"]),
            Route("/health", endpoints.health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: route_error},
        lifespan=lifespan,
    )
