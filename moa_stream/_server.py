"""`moa-stream serve`: the presets and the upstream's models behind an OpenAI-compatible HTTP endpoint.

One wrapped client answers every request, so metering, traces and MoA turns are exactly the library's:
a request's body goes to `client.post("/chat/completions")` as it arrived, and the upstream's response
bytes (SSE or JSON) come back as they arrive. The app is Starlette routes with plain ASGI responses;
`Server` runs it with uvicorn. Both are the optional `server` extra, imported only when an app is built
or served, so the rest of the package (and `moa-stream --help`) works without them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ._config import ConfigError
from ._moa import MOA_PREFIX
from ._session import SESSION_HEADER
from ._transport import MeteringTransport
from ._wire import any_decoder, json_encoder

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request

__all__ = [
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONCURRENT_PER_CLIENT",
    "DEFAULT_PORT",
    "Server",
    "add_serve_parser",
    "create_app",
    "error_body",
    "run_serve",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""Largest request body accepted (1 MiB); a larger one is a 413."""
DEFAULT_MAX_CONCURRENT_PER_CLIENT = 8
"""Chat requests in flight per client (its bearer token, else its address); one more is a 429."""
DEFAULT_GRACEFUL_TIMEOUT = 30
"""On shutdown, how many seconds open responses may run on before uvicorn cancels them."""

_RETRY_AFTER_S = 1
# After the client leaves mid-stream, the relay stops at the next chunk and closes the upstream
# itself (the call ends `closed_early`, as when an SDK caller breaks off); an upstream that sends
# nothing within this time is cancelled instead.
_DISCONNECT_GRACE_S = 1.0
# On shutdown, after uvicorn has finished or cancelled the open responses: how long to wait for
# them to unwind before the client is closed (which drains events and trace lines).
_UNWIND_S = 5.0
# Upstream response headers worth relaying; the rest describe the upstream's connection, not ours.
_RELAYED_HEADERS = ("content-type", "x-request-id", "retry-after")

logger = logging.getLogger("moa_stream.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# -- responses ------------------------------------------------------------------------------------


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """An error in OpenAI's JSON shape (the same `type` convention as the library's own errors)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json_encoder.encode({"error": {"message": message, "type": kind, "param": param, "code": code}})


class _Reply:
    """A whole response (status, headers, body) as an ASGI app; JSON unless `headers` say otherwise."""

    def __init__(self, status: int, body: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = _encoded({"content-type": "application/json", **(headers or {})})
        self.headers.append((b"content-length", str(len(body)).encode("ascii")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.send_to(send)

    async def send_to(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def _error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> _Reply:
    return _Reply(status, error_body(status, message, param=param, code=code), headers=headers)


def _relayed(headers: Any) -> dict[str, str]:
    """The upstream response headers that the caller gets too."""
    return {name: headers[name] for name in _RELAYED_HEADERS if name in headers}


def _encoded(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class _Limits:
    """Chat requests in flight, per client key; never holds a key with nothing in flight."""

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


class _Forward:
    """One chat request sent through the wrapped client, its answer relayed as an ASGI response.

    Holds a concurrency slot for the whole exchange. The upstream's status, content type and bytes go
    back as they arrive; `openai.APIStatusError` goes back with the upstream's status and body. A client
    that leaves closes the upstream response (see `_DISCONNECT_GRACE_S`).
    """

    def __init__(
        self, client: openai.AsyncOpenAI, body: bytes, headers: dict[str, str], *, limits: _Limits, key: str
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
            refusal = _error(
                429,
                f"too many concurrent requests from this client (limit {self._limits.per_client})",
                code="rate_limit_exceeded",
                headers={"retry-after": str(_RETRY_AFTER_S)},
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
            await _Reply(exc.status_code, content, headers=_relayed(exc.response.headers)).send_to(send)
            return
        except openai.APITimeoutError:
            await _error(504, "the upstream did not answer in time", code="upstream_timeout").send_to(send)
            return
        except openai.APIConnectionError:
            await _error(502, "the upstream could not be reached", code="upstream_unreachable").send_to(send)
            return
        except Exception:
            logger.exception("chat request failed before the upstream answered")
            await _error(500, "internal error in moa-stream serve").send_to(send)
            return

        response = stream.response
        chunks = response.aiter_bytes()
        try:
            start = {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _encoded(_relayed(response.headers)),
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


# -- the app --------------------------------------------------------------------------------------


class _Endpoints:
    """The route handlers, around one wrapped client."""

    def __init__(self, client: openai.AsyncOpenAI, *, token: str | None, max_body_bytes: int, limits: _Limits) -> None:
        self.client = client
        self.presets = _preset_names(client)
        self.limits = limits
        self._max_body_bytes = max_body_bytes
        self._token: bytes | None = None
        self._token_key: str | None = None
        if token is not None:
            self._token = token.encode("utf-8")
            # The limiter's key for token holders: a digest, so the token itself is kept only once.
            self._token_key = "token:" + hashlib.sha256(self._token).hexdigest()[:16]

    def _refusal(self, request: Request) -> _Reply | None:
        if self._token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Starlette decodes header values as latin-1: encoding back gives the bytes that were sent.
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self._token):
            return None
        return _error(
            401, "missing or invalid bearer token", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
        )

    def _client_key(self, request: Request) -> str:
        # Without a server token, a client's Authorization header is its own choice, so it cannot
        # name the client; the peer's address (not port: one client opens many connections) does.
        if self._token_key is not None:
            return self._token_key
        return f"peer:{request.client.host}" if request.client is not None else "peer:unknown"

    async def _read_body(self, request: Request) -> bytes | _Reply:
        too_large = _error(413, f"request body is larger than {self._max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body_bytes:
            return too_large
        body = bytearray()
        while True:  # the ASGI messages themselves: a declared length is not what arrives
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return _Reply(499, b"")  # nginx's "client closed request"; nobody is left to read it
            body += message.get("body", b"")
            if len(body) > self._max_body_bytes:
                return too_large
            if not message.get("more_body", False):
                return bytes(body)

    async def chat_completions(self, request: Request) -> _Reply | _Forward:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        body = await self._read_body(request)
        if isinstance(body, _Reply):
            return body
        try:
            payload = any_decoder.decode(body)
        except msgspec.DecodeError as exc:
            return _error(400, f"the request body is not valid JSON: {exc}")
        except UnicodeDecodeError as exc:  # msgspec's error for a string that is not UTF-8
            return _error(400, f"the request body is not valid JSON: invalid UTF-8 at byte {exc.start} ({exc.reason})")
        problem = _problem(payload)
        if problem is not None:
            message, param = problem
            return _error(400, message, param=param)
        headers = {"content-type": "application/json"}
        session_id = request.headers.get(SESSION_HEADER)
        if session_id:
            headers[SESSION_HEADER] = session_id  # the library reads it and removes it before upstream
        return _Forward(self.client, body, headers, limits=self.limits, key=self._client_key(request))

    async def models(self, request: Request) -> _Reply:
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
        return _Reply(200, json_encoder.encode({"object": "list", "data": data}))


def _preset_names(client: openai.AsyncOpenAI) -> list[str]:
    transport = getattr(getattr(client, "_client", None), "_transport", None)
    if not isinstance(transport, MeteringTransport):
        raise ValueError(
            f"create_app() needs a client returned by moa_stream.wrap(), got an unwrapped {type(client).__qualname__}"
        )
    return sorted(transport.presets.presets)


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
    limits = _Limits(max_concurrent_per_client)
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
        return Response(error_body(status, message), status, headers=headers, media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"]),
            Route("/v1/models", endpoints.models, methods=["GET"]),
        ],
        exception_handlers={HTTPException: route_error},
        lifespan=lifespan,
    )


# -- serving --------------------------------------------------------------------------------------


class Server:
    """Serve an ASGI `app` with uvicorn on `host:port` for the duration of an `async with` block.

    `port=0` binds a free port; read it from `port` or `base_url` once entered. Leaving the block
    stops accepting connections, lets open responses finish for up to `graceful_timeout` seconds
    (then cancels them), and runs the app's lifespan shutdown. `aclose()` is idempotent; a closed
    server cannot be reopened. Enter and exit it from the same task, on an asyncio event loop.
    `log_config` is uvicorn's logging configuration (None leaves logging as it is).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        graceful_timeout: int = DEFAULT_GRACEFUL_TIMEOUT,
        log_config: dict[str, Any] | None = None,
        access_log: bool = False,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"Server port must be in 0..65535, got {port!r}")
        if graceful_timeout < 0:
            raise ValueError(f"Server graceful_timeout must be >= 0, got {graceful_timeout!r}")
        self.app = app
        self.host = host
        self._port = port
        self._graceful_timeout = graceful_timeout
        self._log_config = log_config
        self._access_log = access_log
        self._state = "new"
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._socket is None:
            raise RuntimeError("Server.port is known only once the server is entered")
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def base_url(self) -> str:
        """The OpenAI `base_url` for clients: `http://{host}:{port}/v1`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def __aenter__(self) -> Server:
        import uvicorn

        if self._state != "new":
            raise RuntimeError(f"Server cannot be entered when {self._state}")
        self._state = "open"
        # Bound here rather than by uvicorn, which answers a busy port with sys.exit().
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._socket = socket.create_server((self.host, self._port), family=family)
        try:
            config = uvicorn.Config(
                self.app,
                lifespan="on",
                log_config=self._log_config,
                access_log=self._access_log,
                # X-Forwarded-For from a loopback peer would let any local client pick its own address.
                proxy_headers=False,
                timeout_graceful_shutdown=self._graceful_timeout,
            )
            config.load()
            server = uvicorn.Server(config)
            server.lifespan = config.lifespan_class(config)
            try:
                await server.startup(sockets=[self._socket])
            except SystemExit:  # uvicorn's way of saying the app's lifespan startup failed
                raise RuntimeError("the app failed to start (see the uvicorn.error log)") from None
        except BaseException:
            self._state = "closed"
            self._socket.close()
            raise
        self._server = server
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(server.main_loop)  # the date header, and the exit flag
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop accepting, finish or cancel open responses, run the lifespan shutdown (idempotent)."""
        if self._state == "closed":
            return
        self._state = "closed"
        server = self._server
        if server is None:
            return
        server.should_exit = True
        try:
            if self._task_group is not None:
                # Not under a shield: the group's scope must be the innermost one when it exits.
                await self._task_group.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await server.shutdown(sockets=[self._socket] if self._socket is not None else None)


# -- the command ----------------------------------------------------------------------------------


def add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve` to the `moa-stream` subcommands (run it with `run_serve(args)`)."""
    serve = commands.add_parser(
        "serve",
        help="serve presets over an OpenAI-compatible HTTP endpoint",
        description=(
            "Serve /v1/chat/completions (SSE and JSON) and /v1/models: the presets as moa:<name> plus the "
            "upstream's models, every call metered. Needs the server extra: pip install 'moa-stream[server]'."
        ),
    )
    serve.add_argument("--config", type=Path, help="a moa.toml with [presets.<name>] tables")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default: {DEFAULT_PORT})")
    serve.add_argument("--base-url", help="an OpenAI-compatible upstream (default: the embedded simulator)")
    serve.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="environment variable holding the upstream's API key (default: OPENAI_API_KEY if set)",
    )
    serve.add_argument(
        "--token-env", metavar="NAME", help="environment variable holding the bearer token clients must send"
    )
    serve.add_argument("--trace-dir", type=Path, help="write one trace line per turn under this directory")
    serve.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"largest request body accepted (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    serve.add_argument(
        "--max-concurrent-per-client",
        type=_positive_int,
        default=DEFAULT_MAX_CONCURRENT_PER_CLIENT,
        metavar="N",
        help=f"chat requests in flight per client (default: {DEFAULT_MAX_CONCURRENT_PER_CLIENT})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _UsageError(Exception):
    """A command-line problem, reported in one line with exit status 2."""


def run_serve(args: argparse.Namespace) -> int:
    """Run `moa-stream serve` until SIGINT or SIGTERM; the exit status."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(
            f"moa-stream serve: needs the server extra ({exc.name} is missing): pip install 'moa-stream[server]'",
            file=sys.stderr,
        )
        return 2
    try:
        token = _read_env(args.token_env, "--token-env") if args.token_env else None
        anyio.run(_serve_command, args, token)
    except (_UsageError, ConfigError) as exc:
        print(f"moa-stream serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the address is taken, or not ours
        print(f"moa-stream serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _read_env(name: str, option: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise _UsageError(f"{option} {name}: that environment variable is not set or empty")
    return value


def _upstream(args: argparse.Namespace) -> openai.AsyncOpenAI:
    # The endpoint's own clients decide about retries: retrying here too would multiply them.
    if args.base_url is None:
        if args.api_key_env:
            raise _UsageError("--api-key-env needs --base-url (the embedded simulator takes no key)")
        from ._sim import default_simulator
        from ._sim_transport import sim_client

        return sim_client(default_simulator(), max_retries=0)
    key = _read_env(args.api_key_env, "--api-key-env") if args.api_key_env else os.environ.get("OPENAI_API_KEY")
    return openai.AsyncOpenAI(base_url=args.base_url, api_key=key or "none", max_retries=0)


async def _serve_command(args: argparse.Namespace, token: str | None) -> None:
    import uvicorn.config

    from ._wrap import wrap

    client = wrap(_upstream(args), config=args.config, trace_dir=args.trace_dir)
    try:
        app = create_app(
            client,
            token=token,
            max_body_bytes=args.max_body_bytes,
            max_concurrent_per_client=args.max_concurrent_per_client,
        )
        if token is None and not _is_loopback(args.host):
            print(
                f"moa-stream serve: warning: {args.host} is not a loopback address and no --token-env is set; "
                "anyone who can reach it can spend your upstream's credits",
                file=sys.stderr,
            )
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            server = Server(
                app, host=args.host, port=args.port, log_config=uvicorn.config.LOGGING_CONFIG, access_log=True
            )
            async with server:
                models = ", ".join(f"{MOA_PREFIX}{name}" for name in _preset_names(client)) or "none"
                upstream = args.base_url or "the embedded simulator"
                print(
                    f"moa-stream serving on {server.base_url} (upstream: {upstream}; presets: {models}; "
                    "Ctrl-C stops it)",
                    file=sys.stderr,
                    flush=True,
                )
                async for _ in signals:
                    break
    finally:
        await client.close()  # idempotent: the app's lifespan closed it unless startup failed


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
