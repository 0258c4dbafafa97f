"""Session ledger and session state: running totals per session and users' own key-value state,
kept in memory and, with a trace directory, in a sidecar `<trace_dir>/<session_id>.state.json`.

Totals are updated synchronously from each `CallUsage` and `TurnEnd` as it is emitted, so budget
checks see them at once. Sidecars are written off the caller's path by one sink (so writes are
serialized): the latest snapshot of each touched session goes to a unique temporary file, is
flushed and fsynced, then renamed over the old one. A crash leaves the old file or the new one,
never a mix; an older snapshot never replaces a newer one (snapshots carry a version).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ._events import CallUsage, Event, TurnEnd
from ._session import current_session, sanitize_session_id

logger = logging.getLogger("moa_stream")

SIDECAR_SUFFIX = ".state.json"
_FORMAT = 1


class SessionStateError(ValueError):
    """A session's sidecar file cannot be used; the file is left as it is."""


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Usage summed over calls. `cost_usd` is a lower bound when `unpriced_calls` > 0."""

    calls: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0
    """Calls whose price was unknown (their cost is not in `cost_usd`)."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cost_complete(self) -> bool:
        return self.unpriced_calls == 0

    def plus(self, usage: CallUsage) -> Totals:
        return Totals(
            calls=self.calls + 1,
            failed_calls=self.failed_calls + (usage.status == "error"),
            input_tokens=self.input_tokens + (usage.input_tokens or 0),
            cached_input_tokens=self.cached_input_tokens + (usage.cached_input_tokens or 0),
            output_tokens=self.output_tokens + (usage.output_tokens or 0),
            reasoning_tokens=self.reasoning_tokens + (usage.reasoning_tokens or 0),
            cost_usd=self.cost_usd + (usage.cost_usd or 0.0),
            unpriced_calls=self.unpriced_calls + (usage.cost_usd is None and usage.usage_source != "missing"),
        )


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
_state_decoder = msgspec.json.Decoder(dict[str, Any])


def check_json(value: object, where: str) -> None:
    """Refuse what JSON would not give back as it is: sets, bytes and other objects (TypeError),
    NaN and infinities (ValueError), keys that are not strings (TypeError). Tuples are allowed and
    come back as lists. The message names the place, as `where[...]`."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} has no JSON form")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_json(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; JSON keys are strings")
            check_json(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where}: a {type(value).__name__} is not JSON (use lists, dicts, str, int, float, bool, None)")


class _Session:
    __slots__ = ("in_flight", "ledger", "persist", "state", "version", "warned_cost_unknown", "written")

    def __init__(self, ledger: SessionLedger, state: dict[str, Any], version: int, *, persist: bool) -> None:
        self.ledger = ledger
        self.state = state
        self.version = version
        self.written = version
        """The version the sidecar holds."""
        self.persist = persist
        self.in_flight = 0
        """Calls started and not ended yet (budgets count them against a calls limit)."""
        self.warned_cost_unknown = False


DEFAULT_MAX_SESSIONS = 10_000
"""Sessions kept in memory; beyond that, idle ones whose sidecar is up to date are let go (and read
again when they come back). Without a trace directory every session stays in memory."""
_EVICTION_SCAN = 64


class SessionStore:
    """The sessions of one wrapped client: ledgers, state, and their sidecar files."""

    def __init__(
        self, directory: Path | None, *, fail_on_corrupt: bool = False, max_sessions: int = DEFAULT_MAX_SESSIONS
    ) -> None:
        self.directory = directory
        self.fail_on_corrupt = fail_on_corrupt
        """Refuse a session whose sidecar is corrupt (budgets need its totals), instead of going on
        from zero in memory with that file left alone."""
        self.max_sessions = max_sessions
        self._lock = threading.RLock()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._notify: Any = None

    # -- reading and updating (any thread) -----------------------------------------------------

    def path_for(self, session_id: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{sanitize_session_id(session_id)}{SIDECAR_SUFFIX}"

    @contextlib.contextmanager
    def session(self, session_id: str) -> Iterator[_Session]:
        """The session, loaded from its sidecar on first sight, locked for the block."""
        with self._lock:
            found = self._sessions.get(session_id)
            if found is None:
                found = self._sessions[session_id] = self._load(session_id)
                if len(self._sessions) > self.max_sessions:
                    self._evict(keep=session_id)
            else:
                self._sessions.move_to_end(session_id)
            yield found

    def _evict(self, *, keep: str) -> None:
        # Only idle sessions whose sidecar holds their latest version can go: reading the file
        # back gives the same totals and state. Look at a few of the oldest, not at all of them.
        idle = [
            session_id
            for session_id, found in itertools.islice(self._sessions.items(), _EVICTION_SCAN)
            if found.persist and found.in_flight == 0 and found.written == found.version and session_id != keep
        ]
        for session_id in idle[: len(self._sessions) - self.max_sessions]:
            del self._sessions[session_id]

    def record(self, event: Event) -> tuple[Totals, Totals] | None:
        """Add a call's usage or a turn to its session; a call's session totals before and after.
        Never raises: it runs as calls end."""
        # No notice to the sidecar writer here: it receives this very event next.
        if not isinstance(event, CallUsage | TurnEnd):
            return None
        try:
            with self.session(event.session_id) as found:
                ledger = found.ledger
                found.version += 1
                if isinstance(event, TurnEnd):
                    found.ledger = msgspec.structs.replace(ledger, turns=ledger.turns + 1)
                    return None
                found.in_flight = max(0, found.in_flight - 1)
                found.ledger = msgspec.structs.replace(
                    ledger,
                    totals=ledger.totals.plus(event),
                    by_model={**ledger.by_model, event.model: ledger.by_model.get(event.model, Totals()).plus(event)},
                    by_role={**ledger.by_role, event.role: ledger.by_role.get(event.role, Totals()).plus(event)},
                )
                return ledger.totals, found.ledger.totals
        except SessionStateError:
            return None  # the corrupt file was reported when the session was first used

    def ledger(self, session_id: str) -> SessionLedger:
        with self.session(session_id) as found:
            return found.ledger

    def get_state(self, session_id: str) -> dict[str, Any]:
        with self.session(session_id) as found:
            self._check_state(session_id, found)
            return dict(found.state)

    def update_state(self, session_id: str, changes: dict[str, Any], removed: tuple[str, ...] = ()) -> None:
        # Values must come back from the sidecar's JSON as they are read here: refuse what would not
        # (before anything changes), and keep what a restart reads (a tuple becomes a list).
        for key, value in changes.items():
            check_json(value, f"session state {key!r}")
        changes = _state_decoder.decode(_encoder.encode(changes))
        with self.session(session_id) as found:
            self._check_state(session_id, found)
            found.state = {k: v for k, v in {**found.state, **changes}.items() if k not in removed}
            found.version += 1
        self._changed(session_id)

    def _check_state(self, session_id: str, found: _Session) -> None:
        if not found.persist and self.directory is not None:
            raise SessionStateError(f"{self.path_for(session_id)}: the session's state file is corrupt (see the log)")

    # -- loading -------------------------------------------------------------------------------

    def _load(self, session_id: str) -> _Session:
        path = self.path_for(session_id)
        empty = SessionLedger(session_id=session_id)
        if path is None:
            return _Session(empty, {}, 0, persist=False)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return _Session(empty, {}, 0, persist=True)
        except OSError as exc:
            return self._unusable(session_id, f"{path}: cannot read the session state file: {exc.strerror or exc}")
        if not data.strip():
            return _Session(empty, {}, 0, persist=True)
        try:
            sidecar = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            return self._unusable(session_id, f"{path}: not a valid session state file ({exc})")
        if sidecar.format != _FORMAT:
            return self._unusable(session_id, f"{path}: unknown session state format {sidecar.format}")
        if sidecar.ledger.session_id != session_id:
            return self._unusable(
                session_id, f"{path}: holds session {sidecar.ledger.session_id!r}, not {session_id!r}"
            )
        return _Session(sidecar.ledger, sidecar.state, sidecar.version, persist=True)

    def _unusable(self, session_id: str, problem: str) -> _Session:
        message = f"{problem}; it is left as it is (fix or move it away)"
        if self.fail_on_corrupt:
            raise SessionStateError(message)
        logger.error(
            "moa_stream: %s; this process counts session %r from zero and does not write it", message, session_id
        )
        return _Session(SessionLedger(session_id=session_id), {}, 0, persist=False)

    # -- persisting (the sidecar sink, on the dispatcher's thread) -----------------------------

    def bind(self, notify: Any) -> None:
        """`notify(item)` hands an item to the sidecar writer alone."""
        self._notify = notify

    def _changed(self, session_id: str) -> None:
        if self._notify is not None:
            self._notify(_Changed(session_id=session_id))

    def snapshot(self, session_id: str) -> tuple[int, bytes] | None:
        """The session's latest version and its sidecar bytes; None if the file is up to date."""
        with self._lock:
            found = self._sessions.get(session_id)
            if found is None or not found.persist or found.written >= found.version:
                return None
            sidecar = _Sidecar(version=found.version, ledger=found.ledger, state=found.state)
            return found.version, _encoder.encode(sidecar)

    def mark_written(self, session_id: str, version: int) -> None:
        with self._lock:
            found = self._sessions.get(session_id)
            if found is not None:
                found.written = max(found.written, version)


class _Changed(msgspec.Struct, frozen=True, kw_only=True):
    """A session whose sidecar is out of date (travels to the sidecar writer only)."""

    session_id: str


class SidecarWriter:
    """The sink that writes sidecars; being one sink, its writes never overlap."""

    event_types = (CallUsage, TurnEnd, _Changed)

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def __call__(self, event: Event) -> None:
        await self.write_batch([event])

    async def write_batch(self, events: list[Any]) -> None:
        for session_id in dict.fromkeys(event.session_id for event in events):
            snapshot = self.store.snapshot(session_id)
            if snapshot is None:
                continue
            version, data = snapshot
            path = self.store.path_for(session_id)
            assert path is not None
            await anyio.to_thread.run_sync(write_atomically, path, data)
            self.store.mark_written(session_id, version)


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


class SessionState:
    """A session's own key-value store (last write wins), kept in its sidecar, never in traces.

    Values must be JSON-serializable. Get one with `moa_stream.session_state(client)`.
    """

    def __init__(self, store: SessionStore, session_id: str) -> None:
        self._store = store
        self.session_id = session_id

    def get(self, key: str, default: Any = None) -> Any:
        return self._store.get_state(self.session_id).get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._store.update_state(self.session_id, {key: value})

    def delete(self, key: str) -> None:
        """Remove `key` (nothing happens if it is not there)."""
        self._store.update_state(self.session_id, {}, removed=(key,))

    def items(self) -> dict[str, Any]:
        """A copy of everything stored."""
        return self._store.get_state(self.session_id)

    def keys(self) -> list[str]:
        return sorted(self._store.get_state(self.session_id))


def session_id_or_current(session_id: str | None) -> str:
    return current_session() if session_id is None else sanitize_session_id(session_id)
