"""Shared fixtures: the embedded simulator in-process and over loopback HTTP, an event log sink, and a real
Redis server on loopback."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import openai
import pytest

import moa_stream
from moa_stream._sdk import default_http_module
from moa_stream.testing import Fault, SimModel, SimServer, Simulator, sim_client

from .redis_server import RedisServer

# The framework adapter tests' fixtures (a network guard, `native`), there for every module.
pytest_plugins = ["tests.frameworks"]

E = TypeVar("E")
USER = [{"role": "user", "content": "Tell me about streams"}]

# What the bare SDK raises when a stream breaks mid-body: openai 3.x wraps the transport's error,
# openai 2.x lets it through as it is.
DROPPED_MID_STREAM = (openai.APIConnectionError, default_http_module().RemoteProtocolError)
TIMED_OUT_MID_STREAM = (openai.APITimeoutError, default_http_module().ReadTimeout)

MODELS = [
    SimModel(name="sim-small"),
    SimModel(name="sim-large", reply_tokens=40),
    SimModel(name="sim-reasoner", reasoning_tokens=8),
    SimModel(name="sim-slow", tokens_per_s=200.0),
    SimModel(name="sim-stall", fault=Fault(kind="stall", after_chunks=3)),
    SimModel(name="sim-nousage", fault=Fault(kind="no_usage")),
]


async def first_stream(client: openai.AsyncOpenAI, log: EventLog, model: str = "sim-small") -> None:
    """The first stream per upstream and model goes out as the caller wrote it (its usage is then
    estimated): from it the wrapper learns what the upstream sends unasked. Tests about the calls
    after it make it first, and forget its events."""
    await chat_once(client, model, stream=True)
    await moa_stream.flush(client)
    log.events.clear()


def tool_loop() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A user question, and the same user turn one tool call later (what a MoA cadence cache serves)."""
    question: list[dict[str, Any]] = [{"role": "user", "content": "weather?"}]
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    loop = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    return question, loop


async def chat_once(client: openai.AsyncOpenAI, model: str = "sim-small", *, stream: bool = False) -> None:
    """One chat call, streamed to its end or not."""
    if stream:
        response = await client.chat.completions.create(model=model, messages=USER, stream=True)  # type: ignore[arg-type]
        async for _ in response:
            pass
    else:
        await client.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]


class EventLog:
    """A sink that records events and lets a test wait for them without sleeping."""

    def __init__(self) -> None:
        self.events: list[moa_stream.Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: moa_stream.Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, kind: type[E]) -> list[E]:
        with self._changed:
            return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(self, done: Callable[[EventLog], bool], timeout: float = 10.0) -> None:
        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: done(self), timeout)

        if not await anyio.to_thread.run_sync(wait):
            raise AssertionError(f"events did not arrive in {timeout}s; have {self.events!r}")

    async def wait_turns(self, count: int) -> None:
        """Wait until `count` turns have ended (a turn's last events are TurnEnd then TurnTrace)."""
        await self.wait_for(lambda log: len(log.of(moa_stream.TurnTrace)) >= count)


class ServerThread:
    """The simulator's loopback HTTP server on a thread of its own, so that fixtures stay synchronous."""

    def __init__(self, simulator: Simulator) -> None:
        self._simulator = simulator
        self._ready = threading.Event()
        self._stop: anyio.Event | None = None
        self._token: Any = None
        self.base_url = ""
        self._thread = threading.Thread(target=anyio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._stop = anyio.Event()
        self._token = anyio.lowlevel.current_token()
        async with SimServer(self._simulator) as server:
            self.base_url = server.base_url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(10)
        return self

    def run(self, function: Callable[[], Awaitable[Any]]) -> Any:
        """Run `function` on the server's event loop and wait for it (call from a worker thread)."""
        return anyio.from_thread.run(function, token=self._token)

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        anyio.from_thread.run_sync(self._stop.set, token=self._token)
        self._thread.join(10)


@pytest.fixture
def sim() -> Simulator:
    return Simulator(MODELS)


@pytest.fixture(params=["inproc", "http"])
def server(request: pytest.FixtureRequest, sim: Simulator) -> Iterator[ServerThread | None]:
    """None for the in-process transport, else the simulator's HTTP server on loopback."""
    if request.param == "inproc":
        yield None
        return
    with ServerThread(sim) as running:
        yield running


@pytest.fixture
def upstream(server: ServerThread | None, sim: Simulator) -> openai.AsyncOpenAI:
    """A bare AsyncOpenAI talking to the simulator: in-process transport, or real HTTP over loopback."""
    if server is None:
        return sim_client(sim, max_retries=0)
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="sim-key", max_retries=0)


@pytest.fixture
def sim_idle(server: ServerThread | None, sim: Simulator) -> Callable[[], Awaitable[None]]:
    """Wait until the simulator has no response body open (over HTTP it notices a closed socket
    on its own thread, a moment after the client closed it)."""

    async def wait() -> None:
        with anyio.fail_after(10):
            if server is None:
                await sim.wait_idle()
            else:
                await anyio.to_thread.run_sync(server.run, sim.wait_idle)

    return wait


@pytest.fixture
def log() -> EventLog:
    return EventLog()


@pytest.fixture
async def wrapped(
    upstream: openai.AsyncOpenAI, log: EventLog, tmp_path: Path
) -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    """Wrap `upstream` with the given options (sink: `log`; traces in tmp_path); closed afterwards."""
    made: list[openai.AsyncOpenAI] = []

    def make(**options: Any) -> openai.AsyncOpenAI:
        options.setdefault("sinks", [log])
        options.setdefault("trace_dir", tmp_path / "traces")
        made.append(moa_stream.wrap(upstream, **options))
        return made[-1]

    yield make
    for client in made:
        await client.close()


@pytest.fixture
async def client(upstream: openai.AsyncOpenAI, log: EventLog, tmp_path: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    wrapped = moa_stream.wrap(upstream, sinks=[log], trace_dir=tmp_path / "traces")
    yield wrapped
    await wrapped.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session, on a free loopback port; stopped at the end."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, running and empty: restarted if an earlier test stopped it, then flushed."""
    # Imported here: only the Redis tests need the client, and the rest of the suite runs without it.
    import redis

    redis_server.ensure_running()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url
