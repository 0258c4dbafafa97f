"""Session sidecar files: `<trace_dir>/<session_id>.state.json`, a session's ledger and state.

A file is only ever replaced whole: the snapshot goes to a unique temporary file, is flushed and
fsynced, then renamed over the old one, and the directory is fsynced, so a crash leaves the old file
or the new one, never a mix. The writer is one sink of the dispatcher, so writes never overlap and
never happen on the caller's thread.

Several processes may share a trace directory and a session. Each write merges, under an exclusive
lock of the session's lock file: the file's ledger plus what this process added since it last
read or wrote it, the file's state with the keys this process changed. So the file always adds up
every process's calls, and each write brings the other processes' totals into this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
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


class SidecarWrite(NamedTuple):
    """What a process has to merge into a session's file."""

    path: Path
    snapshot: Snapshot
    """The session as this process sees it now."""
    synced: SessionLedger
    """The file's ledger as this process last read or wrote it."""
    changed: frozenset[str]
    """State keys this process set or removed since then."""


_TOTALS = Totals.__struct_fields__


def _totals(a: Totals, b: Totals, sign: int) -> Totals:
    return Totals(**{name: getattr(a, name) + sign * getattr(b, name) for name in _TOTALS})


def _by(a: dict[str, Totals], b: dict[str, Totals], sign: int) -> dict[str, Totals]:
    return {key: _totals(a.get(key, Totals()), b.get(key, Totals()), sign) for key in {**a, **b}}


def ledger_plus(a: SessionLedger, b: SessionLedger, sign: int = 1) -> SessionLedger:
    """`a + b` (or `a - b` with `sign=-1`), field by field: every amount of a ledger adds up."""
    return SessionLedger(
        session_id=a.session_id,
        turns=a.turns + sign * b.turns,
        totals=_totals(a.totals, b.totals, sign),
        by_model=_by(a.by_model, b.by_model, sign),
        by_role=_by(a.by_role, b.by_role, sign),
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process writing `path` (a lock file beside it: the file
    itself is replaced by each write). Without lock support (some network file systems) the write
    goes on unlocked, as a single process's would."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


def merge_into_file(write: SidecarWrite) -> Snapshot:
    """Merge `write` into its file (see the module doc) and return what the file now holds;
    `SidecarProblem` when the file cannot be read, which is then left as it is."""
    session_id = write.snapshot.ledger.session_id
    with _locked(write.path):
        disk = read_sidecar(write.path, session_id)
        base = disk.ledger if disk is not None else SessionLedger(session_id=session_id)
        ledger = ledger_plus(base, ledger_plus(write.snapshot.ledger, write.synced, -1))
        state = dict(disk.state) if disk is not None else {}
        for key in write.changed:
            if key in write.snapshot.state:
                state[key] = write.snapshot.state[key]
            else:
                state.pop(key, None)
        merged = Snapshot(ledger, state, max(disk.version if disk is not None else 0, write.snapshot.version) + 1)
        write_atomically(write.path, encode_sidecar(merged))
    return merged


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
    """The sink that writes sidecars, with what the store gives it: `pending(session_id)` is what
    to merge into the file (None when the file is up to date), `written(session_id, write, merged)`
    hands back what the file holds after the merge.

    Each write is an atomic replace with two fsyncs, which costs far more than a batch of turns, so a
    session's file is written at most once per `interval_s`: a change within it is written when it
    ends, or at the next `flush()` or close, whichever comes first."""

    event_types = (CallUsage, TurnEnd, SessionChanged)

    def __init__(
        self,
        pending: Callable[[str], SidecarWrite | None],
        written: Callable[[str, SidecarWrite, Snapshot], None],
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
            # On the dispatcher's own thread: the caller's loop never waits on it, and a thread hop
            # would cost more than the write.
            try:
                merged = merge_into_file(pending)
            except SidecarProblem as problem:
                logger.error("moa_stream: %s; it is left as it is (fix or move it away)", problem)
            else:
                self._written(session_id, pending, merged)
        self._last.pop(session_id, None)  # kept oldest first
        self._last[session_id] = now
        if len(self._last) > _REMEMBERED:  # forgetting a write only lets its session be written sooner
            for old in list(self._last)[: _REMEMBERED // 2]:
                if old not in self._due:
                    del self._last[old]
