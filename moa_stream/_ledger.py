"""The session store: running totals per session (the ledger), users' own key-value state, and the
calls each session has in flight, in memory and, with a trace directory, in sidecar files.

The store owns its records: every change goes through its methods, under its lock. Totals are
updated synchronously as each call ends, so budget checks see them at once; a call is admitted (and
counted in flight) under the same lock that its budget check reads the totals with. Sidecars are
read when a session is first used (off the caller's event loop, see `Engine.open_session`) and
written by the sidecar sink (`_sidecar.SidecarWriter`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

from ._budget import BudgetBreach
from ._errors import error_response
from ._events import CallUsage, TurnEnd
from ._session import current_session, sanitize_session_id
from ._sidecar import SIDECAR_SUFFIX, SessionLedger, SidecarProblem, Snapshot, read_sidecar
from ._totals import Totals

logger = logging.getLogger("moa_stream")

DEFAULT_MAX_SESSIONS = 10_000
"""Sessions kept in memory; beyond that, idle ones whose sidecar is up to date are let go (and read
again when they come back). Without a trace directory every session stays in memory."""
_EVICTION_SCAN = 64

Admission = Callable[[Totals, int], BudgetBreach | None]
"""Given a session's totals and the calls it has started (ended and in flight), the limit that
refuses one more call, or None."""


class SessionStateError(ValueError):
    """A session's sidecar file cannot be used; the file is left as it is."""

    def response(self, http: ModuleType) -> Any:
        """The error a call of this session gets: a 500 that names the file."""
        return error_response(http, 500, str(self), code="session_state_error")


_encoder = msgspec.json.Encoder()
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
    __slots__ = ("in_flight", "ledger", "persist", "state", "version", "warned", "written")

    def __init__(self, ledger: SessionLedger, state: dict[str, Any], version: int, *, persist: bool) -> None:
        self.ledger = ledger
        self.state = state
        self.version = version
        self.written = version
        """The version the sidecar holds."""
        self.persist = persist
        self.in_flight = 0
        """Calls admitted and not ended yet."""
        self.warned: set[str] = set()


class SessionStore:
    """The sessions of one wrapped client: ledgers, state, calls in flight, and their sidecar files."""

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
        self._on_change: Callable[[str], None] | None = None

    def path_for(self, session_id: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{sanitize_session_id(session_id)}{SIDECAR_SUFFIX}"

    # -- calls and turns -------------------------------------------------------------------------

    def admit(self, session_id: str, refusal: Admission | None = None) -> None:
        """Count one more call in flight for the session, unless `refusal` (a budget's check of its
        totals) names a limit, which is raised and nothing is counted. Each admitted call is
        released exactly once, by `record` of its usage."""
        with self._lock:
            found = self._found(session_id)
            if refusal is not None:
                breach = refusal(found.ledger.totals, found.ledger.totals.calls + found.in_flight)
                if breach is not None:
                    raise breach
            found.in_flight += 1

    def record(self, event: CallUsage | TurnEnd) -> tuple[Totals, Totals] | None:
        """Add a call's usage (releasing its admission) or a turn to its session; for a call, the
        session's totals before and after. Never raises: it runs as calls end."""
        with self._lock:
            try:
                found = self._found(event.session_id)
            except SessionStateError:
                return None  # the corrupt file was reported when the session was first used
            ledger = found.ledger
            found.version += 1
            if isinstance(event, TurnEnd):
                found.ledger = msgspec.structs.replace(ledger, turns=ledger.turns + 1)
                return None
            found.in_flight -= 1
            found.ledger = msgspec.structs.replace(
                ledger,
                totals=ledger.totals.plus(event),
                by_model={**ledger.by_model, event.model: ledger.by_model.get(event.model, Totals()).plus(event)},
                by_role={**ledger.by_role, event.role: ledger.by_role.get(event.role, Totals()).plus(event)},
            )
            return ledger.totals, found.ledger.totals

    def warn_once(self, session_id: str, key: str) -> bool:
        """True the first time `key` is asked for the session, False after."""
        with self._session(session_id) as found:
            first = key not in found.warned
            found.warned.add(key)
            return first

    def ledger(self, session_id: str) -> SessionLedger:
        with self._session(session_id) as found:
            return found.ledger

    # -- the users' state ------------------------------------------------------------------------

    def get_state(self, session_id: str) -> dict[str, Any]:
        with self._session(session_id) as found:
            self._check_state(session_id, found)
            return dict(found.state)

    def update_state(self, session_id: str, changes: dict[str, Any], removed: tuple[str, ...] = ()) -> None:
        # Values must come back from the sidecar's JSON as they are read here: refuse what would not
        # (before anything changes), and keep what a restart reads (a tuple becomes a list).
        for key, value in changes.items():
            check_json(value, f"session state {key!r}")
        changes = _state_decoder.decode(_encoder.encode(changes))
        with self._session(session_id) as found:
            self._check_state(session_id, found)
            found.state = {k: v for k, v in {**found.state, **changes}.items() if k not in removed}
            found.version += 1
        if self._on_change is not None:
            self._on_change(session_id)

    def _check_state(self, session_id: str, found: _Session) -> None:
        if not found.persist and self.directory is not None:
            raise SessionStateError(f"{self.path_for(session_id)}: the session's state file is corrupt (see the log)")

    # -- loading, eviction -----------------------------------------------------------------------

    def is_loaded(self, session_id: str) -> bool:
        return self.directory is None or session_id in self._sessions

    def load(self, session_id: str) -> None:
        """Read the session's sidecar if it is not in memory (a blocking read: run it in a thread);
        `SessionStateError` for a corrupt one when the store must refuse it."""
        with self._session(session_id):
            pass

    @contextlib.contextmanager
    def _session(self, session_id: str) -> Iterator[_Session]:
        """The session, loaded from its sidecar on first sight, locked for the block."""
        with self._lock:
            yield self._found(session_id)

    def _found(self, session_id: str) -> _Session:
        """The session (the lock held), loaded from its sidecar on first sight."""
        found = self._sessions.get(session_id)
        if found is None:
            found = self._sessions[session_id] = self._read(session_id)
            if len(self._sessions) > self.max_sessions:
                self._evict(keep=session_id)
        else:
            self._sessions.move_to_end(session_id)
        return found

    def _read(self, session_id: str) -> _Session:
        path = self.path_for(session_id)
        if path is None:
            return _Session(SessionLedger(session_id=session_id), {}, 0, persist=False)
        try:
            snapshot = read_sidecar(path, session_id)
        except SidecarProblem as problem:
            message = f"{problem}; it is left as it is (fix or move it away)"
            if self.fail_on_corrupt:
                raise SessionStateError(message) from None
            logger.error(
                "moa_stream: %s; this process counts session %r from zero and does not write it", message, session_id
            )
            return _Session(SessionLedger(session_id=session_id), {}, 0, persist=False)
        if snapshot is None:
            return _Session(SessionLedger(session_id=session_id), {}, 0, persist=True)
        return _Session(snapshot.ledger, snapshot.state, snapshot.version, persist=True)

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

    # -- persisting (the sidecar sink, on the dispatcher's thread) -----------------------------

    def on_change(self, notify: Callable[[str], None]) -> None:
        """`notify(session_id)` is called when a session's state changes without an event."""
        self._on_change = notify

    def pending(self, session_id: str) -> tuple[Path, Snapshot] | None:
        """Where the session's sidecar goes and its latest snapshot; None if the file is up to date."""
        with self._lock:
            found = self._sessions.get(session_id)
            path = self.path_for(session_id)
            if found is None or path is None or not found.persist or found.written >= found.version:
                return None
            return path, Snapshot(found.ledger, found.state, found.version)

    def written(self, session_id: str, version: int) -> None:
        with self._lock:
            found = self._sessions.get(session_id)
            if found is not None:
                found.written = max(found.written, version)


class SessionState:
    """A session's own key-value store (last write wins), kept in its sidecar, never in traces.

    Values must be JSON. Get one with `moa_stream.session_state(client)`.
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
