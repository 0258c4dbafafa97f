"""The simulator over real HTTP/1.1 on loopback: h11 for the protocol, anyio for the sockets.

Used where an in-process transport would hide something: real sockets, keep-alive, chunked
framing, timeouts, and clients that go away mid-stream.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from types import TracebackType

import anyio
import anyio.abc
import h11

from ._models import SimDisconnect, SimResponse
from ._simulator import Simulator

_RECEIVE_SIZE = 65536
# Errors that mean the peer is gone or misbehaved: the connection ends, the server carries on.
_CONNECTION_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
    h11.ProtocolError,
)


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class SimServer:
    """Serve `simulator` on `http://{host}:{port}/v1` for the duration of an `async with` block.

    `port=0` binds a free port; read it from `port` or `base_url` once entered. The server owns one
    task group (listener plus one task per connection), cancelled by `aclose()`, which is
    idempotent; a closed server cannot be reopened. Enter and exit it from the same task.
    """

    def __init__(self, simulator: Simulator, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"SimServer port must be in 0..65535, got {port!r}")
        self.simulator = simulator
        self._host = host
        self._port = port
        self._state = _State.NEW
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._listener is None:
            raise RuntimeError("SimServer.port is known only once the server is entered")
        port: int = self._listener.extra(anyio.abc.SocketAttribute.local_port)
        return port

    @property
    def base_url(self) -> str:
        """The OpenAI `base_url` for clients: `http://{host}:{port}/v1`."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    async def __aenter__(self) -> SimServer:
        if self._state is not _State.NEW:
            raise RuntimeError(f"SimServer cannot be entered when {self._state.value}")
        self._listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._state = _State.OPEN
        self._task_group.start_soon(self._listener.serve, self._serve_connection, self._task_group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening and drop every connection (idempotent)."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        try:
            if self._task_group is not None:
                # Not under a shield: the group's scope must be the innermost one when it exits.
                # Its exit waits for the cancelled connection tasks anyway.
                self._task_group.cancel_scope.cancel()
                await self._task_group.__aexit__(None, None, None)
        finally:
            if self._listener is not None:
                with anyio.CancelScope(shield=True):
                    await self._listener.aclose()

    # -- one connection ----------------------------------------------------------------------

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                received = await _receive_request(conn, stream)
                if received is None:
                    return
                request, body = received
                headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
                response = await self.simulator.handle(
                    request.method.decode("ascii"), request.target.decode("latin-1"), headers, body
                )
                if not await self._respond(conn, stream, response):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except _CONNECTION_ERRORS:
            return
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _respond(self, conn: h11.Connection, stream: anyio.abc.SocketStream, response: SimResponse) -> bool:
        """Send one response; False when the connection must be dropped."""
        head = h11.Response(status_code=response.status, headers=response.headers)
        body = response.body
        peer_gone = False

        async def watch_peer(scope: anyio.CancelScope) -> None:
            # The client sends nothing while it waits for the response, so a read that returns
            # is either the next pipelined request (kept for h11) or the client leaving.
            nonlocal peer_gone
            while True:
                try:
                    data = await stream.receive(_RECEIVE_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    data = b""
                if not data:
                    peer_gone = True
                    scope.cancel()
                    return
                conn.receive_data(data)

        completed = False
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(watch_peer, task_group.cancel_scope)
                try:
                    await stream.send(conn.send(head))
                    async for chunk in body:
                        await stream.send(conn.send(h11.Data(data=chunk)))
                    await stream.send(conn.send(h11.EndOfMessage()))
                    completed = True
                except SimDisconnect:
                    pass  # dropping the connection mid-body is the point
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass  # the client left while we were writing
                finally:
                    task_group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await _aclose(body)
        return completed and not peer_gone


async def _receive_request(conn: h11.Connection, stream: anyio.abc.SocketStream) -> tuple[h11.Request, bytes] | None:
    """The next request and its body, or None once the client has closed the connection."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(_RECEIVE_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, bytes(body)
        else:
            return None


async def _aclose(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


async def serve_forever(simulator: Simulator, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `simulator` until cancelled (the CLI's `serve` command); prints nothing."""
    async with SimServer(simulator, host=host, port=port):
        await anyio.sleep_forever()
