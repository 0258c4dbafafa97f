"""Serving an ASGI app with uvicorn for the duration of an `async with` block."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from ._asgi import DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    import uvicorn


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
