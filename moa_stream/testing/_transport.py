"""An in-process `httpx`/`httpx2` transport that answers from a `Simulator`: no sockets, no threads.

The client only accepts transports, responses and byte streams of its own module, so the concrete
classes are built per module (cached) on top of the module-agnostic logic here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import openai

from .._sdk import default_http_module, for_module
from ._models import SimDisconnect, SimTimeout
from ._simulator import Simulator, default_simulator

_DROPPED = "peer closed connection without sending complete message body"


class SimTransport:
    """`http_module.AsyncClient(transport=SimTransport(simulator))` sends requests to `simulator`.

    Instances are of a per-module subclass that also derives from `http_module.AsyncBaseTransport`
    (default: the module the installed openai SDK uses). A `SimDisconnect` in a body surfaces as
    `http_module.RemoteProtocolError`, exactly what a real dropped connection raises, and the
    request's read timeout is honoured: a longer wait raises `http_module.ReadTimeout`.
    """

    def __new__(cls, simulator: Simulator, *, http_module: ModuleType | None = None) -> SimTransport:
        if cls is SimTransport:
            cls = for_module(SimTransport, http_module or default_http_module(), "AsyncBaseTransport")
        return object.__new__(cls)

    def __init__(self, simulator: Simulator, *, http_module: ModuleType | None = None) -> None:
        self.simulator = simulator
        self._module = http_module or default_http_module()

    async def handle_async_request(self, request: Any) -> Any:
        """Serve one `http_module.Request` from the simulator (the client's transport hook)."""
        body = await request.aread()
        read_timeout = (request.extensions.get("timeout") or {}).get("read")
        # raw_path keeps the query string (Responses' `?stream=true&starting_after=N`), as a socket would.
        target = request.url.raw_path.decode("ascii")
        try:
            response = await self.simulator.handle(
                request.method, target, request.headers, body, read_timeout=read_timeout
            )
        except SimTimeout as exc:
            raise self._module.ReadTimeout(str(exc), request=request) from exc
        stream = for_module(_SimByteStream, self._module, "AsyncByteStream")(response.body, self._module)
        return self._module.Response(response.status, headers=response.headers, stream=stream)

    async def aclose(self) -> None:
        """Nothing to release: there are no connections."""


class _SimByteStream:
    """The response body: iterates the simulator's body, and closes it when the client closes."""

    def __init__(self, body: AsyncIterator[bytes], module: ModuleType) -> None:
        self._body = body
        self._module = module

    # `__aiter__` returns self (not a fresh generator) so that a second pass, such as the openai
    # SDK draining after [DONE], resumes the same body instead of failing.
    def __aiter__(self) -> _SimByteStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._body.__anext__()
        except SimDisconnect as exc:
            raise self._module.RemoteProtocolError(_DROPPED) from exc
        except SimTimeout as exc:
            raise self._module.ReadTimeout(str(exc)) from exc

    async def aclose(self) -> None:
        aclose = getattr(self._body, "aclose", None)
        if aclose is not None:
            await aclose()


def sim_client(simulator: Simulator | None = None, **kwargs: Any) -> openai.AsyncOpenAI:
    """An `openai.AsyncOpenAI` whose requests are answered in-process by `simulator`.

    `simulator` defaults to `default_simulator()`; `kwargs` go to `AsyncOpenAI` (for example
    `max_retries`), and may override `base_url` and `api_key`.
    """
    module = default_http_module()
    transport = SimTransport(simulator if simulator is not None else default_simulator(), http_module=module)
    kwargs.setdefault("base_url", "http://sim.local/v1")
    kwargs.setdefault("api_key", "sim-key")
    return openai.AsyncOpenAI(http_client=module.AsyncClient(transport=transport), **kwargs)
