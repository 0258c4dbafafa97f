"""Replicas of `moa-stream serve` for multi-process tests: real processes on loopback, started together,
each with its own trace directory and log file, stopped with SIGINT (or killed) by the test.

A replica's output goes to a file, never to a pipe: the access log of a busy replica would fill a pipe
that nobody reads and stop the server. Readiness is the banner line in that file.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import openai

import moa_stream
from moa_stream import CallUsage, SessionLedger, StoreConfig, Totals, TurnTrace

T = TypeVar("T")

BANNER = "moa-stream serving on "
START_TIMEOUT = 30.0
"""Three interpreters importing the package at once on two cores take a few seconds; this is the bound."""
STOP_TIMEOUT = 15.0


class Replica:
    """One `moa-stream serve` process; `base_url` is known once it printed its banner."""

    def __init__(self, index: int, directory: Path, command: list[str]) -> None:
        self.index = index
        self.directory = directory
        self.trace_dir = directory / "traces"
        self.log_path = directory / "serve.log"
        self.base_url = ""
        self.killed = False
        directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, "--trace-dir", str(self.trace_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def poll_ready(self) -> bool:
        """True once the banner is out; raises if the process exited before it."""
        for line in self.log().splitlines():
            if line.startswith(BANNER):
                self.base_url = line.split()[3]
                return True
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(
                f"replica {self.index} exited with code {code} before serving; its output:\n{self.log()}"
            )
        return False

    def client(self, token: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=token, max_retries=0, timeout=30)

    def trace_file(self, session_id: str) -> Path:
        return self.trace_dir / f"{session_id}.jsonl"

    def traces(self, session_id: str) -> list[TurnTrace]:
        path = self.trace_file(session_id)
        return list(moa_stream.read_traces(path)) if path.exists() else []

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed, nothing is settled."""
        self.killed = True
        self.process.kill()
        self.process.wait()

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def wait_stopped(self) -> int:
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"replica {self.index} did not stop on SIGINT; its output:\n{self.log()}") from None


class Replicas:
    """`count` replicas of `moa-stream serve --base-url upstream --config <config> ...` under `root`,
    each in `root/replica-<i>` with its own trace directory. Leaving the block stops them all with
    SIGINT (a graceful stop drains traces and settlements) and checks that each exited with 0."""

    def __init__(
        self,
        root: Path,
        *,
        upstream: str,
        config: str,
        store: str | None = None,
        keys: str | None = None,
        count: int = 3,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.config_path = root / "moa.toml"
        self.config_path.write_text(config)
        command = [sys.executable, "-m", "moa_stream", "serve", "--port", "0", "--base-url", upstream]
        command += ["--config", str(self.config_path), "--max-concurrent-per-client", "256"]
        if store is not None:
            command += ["--store", store]
        if keys is not None:
            keys_path = root / "keys.toml"
            keys_path.write_text(keys)
            command += ["--keys", str(keys_path)]
        self.command = command
        self.count = count
        self.replicas: list[Replica] = []

    def __enter__(self) -> Replicas:
        self.replicas = [Replica(i, self.root / f"replica-{i}", self.command) for i in range(self.count)]
        try:
            deadline = time.monotonic() + START_TIMEOUT
            waiting = list(self.replicas)
            while waiting:
                waiting = [replica for replica in waiting if not replica.poll_ready()]
                if waiting and time.monotonic() > deadline:
                    logs = "\n".join(replica.log() for replica in waiting)
                    raise RuntimeError(f"{len(waiting)} replicas did not serve within {START_TIMEOUT}s:\n{logs}")
                time.sleep(0.02)  # a foreign process's readiness can only be polled
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        codes = self.stop()
        if exc_type is None:
            failed = {i: code for i, code in codes.items() if code != 0}
            assert not failed, f"replicas exited with {failed}:\n" + "\n".join(self[i].log() for i in failed)

    def stop(self) -> dict[int, int]:
        """Stop every replica still running (all signalled first, so they stop side by side)."""
        running = [replica for replica in self.replicas if not replica.killed]
        for replica in running:
            replica.interrupt()
        return {replica.index: replica.wait_stopped() for replica in running}

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def __len__(self) -> int:
        return len(self.replicas)

    def traces(self, session_id: str) -> list[TurnTrace]:
        """The session's trace records from every replica's trace directory."""
        return [trace for replica in self.replicas for trace in replica.traces(session_id)]


@contextlib.asynccontextmanager
async def callers(
    replicas: Replicas | Sequence[Replica], token: str = "unused"
) -> AsyncIterator[list[openai.AsyncOpenAI]]:
    """One `openai.AsyncOpenAI` per replica (no retries), closed on the way out; a test spreads its
    calls round-robin with `clients[i % len(clients)]`."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(replica.client(token)) for replica in replicas]


def usages(traces: Sequence[TurnTrace]) -> list[CallUsage]:
    return [call.usage for trace in traces for call in trace.calls]


def totals_of(calls: Sequence[CallUsage]) -> Totals:
    """What a ledger holding exactly these calls would say."""
    return functools.reduce(Totals.plus, calls, Totals())


@contextlib.asynccontextmanager
async def ledger_reader(store: StoreConfig) -> AsyncIterator[Callable[[str], SessionLedger]]:
    """`read(session_id)`: the session's ledger as the shared store holds it, read through a client
    of this process wrapped with the same store (the way an operator's script would)."""
    client = moa_stream.wrap(openai.AsyncOpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1"), store=store)
    try:
        yield functools.partial(moa_stream.session_ledger, client)
    finally:
        await client.close()


async def wait_until(
    probe: Callable[[], T | Awaitable[T]], done: Callable[[T], bool], *, timeout: float, every: float = 0.05
) -> T:
    """Probe (sync or async) until `done(value)` holds or `timeout` seconds have passed; the last value
    either way, for the caller to assert on (so a failure shows what was seen, not only that time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        value: T = await found if inspect.isawaitable(found) else found  # type: ignore[assignment]
        if done(value) or time.monotonic() > deadline:
            return value
        await anyio.sleep(every)
