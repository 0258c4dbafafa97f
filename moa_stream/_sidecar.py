"""Session sidecar files: `<trace_dir>/<session_id>.state.json`, a session's ledger and state.

The format is versioned: every snapshot carries a version, so an older one never replaces a newer
one. A file is only ever replaced whole: the snapshot goes to a unique temporary file, is flushed and
fsynced, then renamed over the old one, and the directory is fsynced, so a crash leaves the old file
or the new one, never a mix. The writer is one sink of the dispatcher, so writes never overlap and
never happen on the caller's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from ._dispatch import Notice
from ._events import CallUsage, TurnEnd
from ._totals import Totals

logger = logging.getLogger("moa_stream")

SIDECAR_SUFFIX = ".state.json"
_FORMAT = 1


class SessionLedger(msgspec.Struct, frozen=True, kw_only=True):
    """What one session has used, across process restarts when there is a trace directory."""

    session_id: str
    turns: int = 0
    totals: Totals = Totals()
    by_model: dict[str, Totals] = {}
    """Per model, as the responses named it."""
    by_role: dict[str, Totals] = {}
    """Per role: `direct`, `reference`, `aggregator`."""


class _Sidecar(msgspec.Struct, kw_only=True):
    format: int = _FORMAT
    version: int = 0
    ledger: SessionLedger
    state: dict[str, Any] = {}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Sidecar)


class Snapshot(NamedTuple):
    """A session as its sidecar holds it."""

    ledger: SessionLedger
    state: dict[str, Any]
    version: int


class SidecarProblem(Exception):
    """A sidecar file that cannot be used (unreadable, corrupt, another session's)."""


def read_sidecar(path: Path, session_id: str) -> Snapshot | None:
    """The snapshot in `path`; None when there is none yet (missing or empty file); `SidecarProblem`
    naming the file and what is wrong with it otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SidecarProblem(f"{path}: cannot read the session state file: {exc.strerror or exc}") from None
    if not data.strip():
        return None
    try:
        sidecar = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SidecarProblem(f"{path}: not a valid session state file ({exc})") from None
    if sidecar.format != _FORMAT:
        raise SidecarProblem(f"{path}: unknown session state format {sidecar.format}")
    if sidecar.ledger.session_id != session_id:
        raise SidecarProblem(f"{path}: holds session {sidecar.ledger.session_id!r}, not {session_id!r}")
    return Snapshot(sidecar.ledger, sidecar.state, sidecar.version)


def encode_sidecar(snapshot: Snapshot) -> bytes:
    return _encoder.encode(_Sidecar(version=snapshot.version, ledger=snapshot.ledger, state=snapshot.state))


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash at any point leaves the old file or the new one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself must survive a power loss
    finally:
        os.close(directory)


class SessionChanged(Notice, frozen=True, kw_only=True):
    """A notice to the sidecar writer alone: a session's state changed without an event."""

    session_id: str


SIDECAR_INTERVAL_S = 1.0
"""The least time between two writes of one session's sidecar (a flush or close writes at once)."""
_REMEMBERED = 4096


class SidecarWriter:
    """The sink that writes sidecars, with what the store gives it: `pending(session_id)` is the
    path and the snapshot to write (None when the file is up to date), `written(session_id, version)`
    records that it was.

    Each write is an atomic replace with two fsyncs, which costs far more than a batch of turns, so a
    session's file is written at most once per `interval_s`: a change within it is written when it
    ends, or at the next `flush()` or close, whichever comes first."""

    event_types = (CallUsage, TurnEnd, SessionChanged)

    def __init__(
        self,
        pending: Callable[[str], tuple[Path, Snapshot] | None],
        written: Callable[[str, int], None],
        *,
        interval_s: float = SIDECAR_INTERVAL_S,
    ) -> None:
        self._pending = pending
        self._written = written
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        """When each session's file was last written (loop time), oldest first."""
        self._due: dict[str, None] = {}
        """Sessions changed since their last write, waiting for their interval to end."""
        self._timer: asyncio.TimerHandle | None = None

    async def __call__(self, event: CallUsage | TurnEnd | SessionChanged) -> None:
        await self.write_batch([event])

    async def write_batch(self, events: list[CallUsage | TurnEnd | SessionChanged]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for session_id in dict.fromkeys(event.session_id for event in events):
            last = self._last.get(session_id)
            if last is not None and now - last < self._interval_s:
                self._due[session_id] = None
            else:
                self._write(session_id, now)
        if self._due and self._timer is None:
            earliest = min(self._last[session_id] for session_id in self._due)
            self._timer = loop.call_at(earliest + self._interval_s, self._on_timer)

    async def flush(self) -> None:
        """Write every session still due (the dispatcher calls it when a flush reaches this sink)."""
        self._write_due(asyncio.get_running_loop().time())

    async def aclose(self) -> None:
        await self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self._write_due(asyncio.get_running_loop().time())
        except OSError as exc:
            # Still due: the next batch, flush or close tries again.
            logger.warning("moa_stream: cannot write a session state file: %s", exc)

    def _write_due(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._due:
            session_id = next(iter(self._due))
            self._write(session_id, now)
            del self._due[session_id]

    def _write(self, session_id: str, now: float) -> None:
        pending = self._pending(session_id)
        if pending is not None:
            path, snapshot = pending
            # On the dispatcher's own thread: the caller's loop never waits on it, and a thread hop
            # would cost more than the write.
            write_atomically(path, encode_sidecar(snapshot))
            self._written(session_id, snapshot.version)
        self._last.pop(session_id, None)  # kept oldest first
        self._last[session_id] = now
        if len(self._last) > _REMEMBERED:  # forgetting a write only lets its session be written sooner
            for old in list(self._last)[: _REMEMBERED // 2]:
                if old not in self._due:
                    del self._last[old]
