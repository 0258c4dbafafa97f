"""The embedded store: running totals per session (the ledger), users' own key-value state, budget
holds of the calls in flight, per-session budgets and key totals, in memory and, with a trace
directory, in sidecar files (one process; `_redis_store` shares the same between processes).

The store owns its records: every change goes through its methods, under its lock. Totals are
updated synchronously as each call ends, so budget checks see them at once; a call's hold is
checked and added under the same lock. Sidecars are read when a session is first used (off the
caller's event loop, see `open_session`) and written by the sidecar sink (`_sidecar.SidecarWriter`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec

from ._budget import Budget, BudgetBreach
from ._cadence import ReferenceCache
from ._errors import error_response
from ._events import CallUsage, TurnEnd
from ._holds import NO_AMOUNTS, Amounts, Hold, ScopeLimits, admit_group, refusal
from ._quirks import UpstreamQuirks
from ._session import current_session, sanitize_session_id
from ._sidecar import (
    SIDECAR_SUFFIX,
    SessionLedger,
    SidecarProblem,
    SidecarWrite,
    Snapshot,
    ledger_plus,
    read_sidecar,
)
from ._store import Settled, json_changes
from ._totals import Totals

logger = logging.getLogger("moa_stream")

DEFAULT_MAX_SESSIONS = 10_000
"""Sessions kept in memory; beyond that, idle ones whose sidecar is up to date are let go (and read
again when they come back). Without a trace directory every session stays in memory."""
_EVICTION_SCAN = 64
_SETTLED_KEPT = 100_000


class SessionStateError(ValueError):
    """A session's sidecar file cannot be used; the file is left as it is."""

    def response(self, http: ModuleType) -> Any:
        """The error a call of this session gets: a 500 that names the file."""
        return error_response(http, 500, str(self), code="session_state_error")


class _Holds:
    """The open holds of one scope (a session, an API key), and what they add up to."""

    __slots__ = ("by_call", "held")

    def __init__(self) -> None:
        self.by_call: dict[str, Amounts] = {}
        self.held = NO_AMOUNTS

    def add(self, hold: Hold) -> None:
        self.by_call[hold.call_id] = hold.amounts
        self.held = self.held.plus(hold.amounts)

    def drop(self, call_id: str) -> None:
        amounts = self.by_call.pop(call_id, None)
        if amounts is not None:
            self.held = self.held.minus(amounts) if self.by_call else NO_AMOUNTS


class _Key:
    __slots__ = ("holds", "totals")

    def __init__(self) -> None:
        self.totals = Totals()
        self.holds = _Holds()


class _Session:
    __slots__ = ("budget", "changed", "holds", "ledger", "persist", "state", "synced", "version", "warned", "written")

    def __init__(self, ledger: SessionLedger, state: dict[str, Any], version: int, *, persist: bool) -> None:
        self.ledger = ledger
        self.state = state
        self.version = version
        self.written = version
        """The version the sidecar holds."""
        self.synced = ledger
        """The file's ledger as this process last read or wrote it (other processes add to it)."""
        self.changed: dict[str, int] = {}
        """State keys set or removed here since then, with the version of their change."""
        self.persist = persist
        self.holds = _Holds()
        """The holds of calls admitted and not ended yet."""
        self.budget: Budget | None = None
        self.warned: set[str] = set()


class MemoryStore:
    """The sessions of one wrapped client: ledgers, state, holds, and their sidecar files."""

    where = "memory"

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
        self._keys: dict[str, _Key] = {}
        self._settled: OrderedDict[str, None] = OrderedDict()
        """Call ids settled lately: a second settlement of one is ignored."""
        self._on_change: Callable[[str], None] | None = None

    def path_for(self, session_id: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{sanitize_session_id(session_id)}{SIDECAR_SUFFIX}"

    # -- calls and turns -------------------------------------------------------------------------

    async def open_session(self, session_id: str) -> None:
        """Read the session's sidecar, if it is not in memory yet, in a worker thread: the first
        request of a session never blocks the caller's event loop on the disk."""
        if not self.is_loaded(session_id):
            await anyio.to_thread.run_sync(self.load, session_id)
        self.ledger(session_id)  # a corrupt sidecar a budget needs raises SessionStateError here

    def session_budget(self, session_id: str) -> Budget | None:
        with self._session(session_id) as found:
            return found.budget

    def set_session_budget(self, session_id: str, budget: Budget | None) -> None:
        with self._session(session_id) as found:
            found.budget = budget

    async def reserve(
        self, session_id: str, scopes: Sequence[ScopeLimits], holds: Sequence[Hold]
    ) -> tuple[list[Hold], BudgetBreach | None]:
        with self._lock:
            found = self._found(session_id)
            checked: list[tuple[ScopeLimits, Totals, _Holds]] = []
            for scope in scopes:
                if scope.scope == "key":
                    key = self._keys.setdefault(scope.scope_id, _Key())
                    checked.append((scope, key.totals, key.holds))
                else:
                    if found.budget is not None:
                        scope = scope._replace(limits=found.budget.session)
                    checked.append((scope, found.ledger.totals, found.holds))

            def check(adding: Amounts) -> BudgetBreach | None:
                for scope, totals, open_holds in checked:
                    breach = refusal(scope, totals, open_holds.held, adding, session_id=session_id)
                    if breach is not None:
                        return breach
                return None

            admitted, breach = admit_group(holds, check)
            for hold in admitted:
                for _, _, open_holds in checked:
                    open_holds.add(hold)
            return admitted, breach

    def settle(self, usage: CallUsage, key_id: str | None, then: Settled) -> None:
        with self._lock:
            if usage.call_id in self._settled:
                then(None)
                return
            self._settled[usage.call_id] = None
            if len(self._settled) > _SETTLED_KEPT:
                self._settled.popitem(last=False)
            if key_id is not None:
                key = self._keys.setdefault(key_id, _Key())
                key.holds.drop(usage.call_id)
                key.totals = key.totals.plus(usage)
            then(self._record_usage(usage))

    def release(self, session_id: str, key_id: str | None, call_ids: Sequence[str]) -> None:
        with self._lock:
            found = self._sessions.get(session_id)
            key = self._keys.get(key_id) if key_id is not None else None
            for call_id in call_ids:
                if found is not None:
                    found.holds.drop(call_id)
                if key is not None:
                    key.holds.drop(call_id)

    def record_turn(self, end: TurnEnd) -> None:
        with self._lock:
            try:
                found = self._found(end.session_id)
            except SessionStateError:
                return  # the corrupt file was reported when the session was first used
            found.version += 1
            found.ledger = msgspec.structs.replace(found.ledger, turns=found.ledger.turns + 1)

    def _record_usage(self, event: CallUsage) -> tuple[Totals, Totals] | None:
        """Add a call's usage to its session, dropping its hold; the totals before and after.
        Never raises: it runs as calls end."""
        try:
            found = self._found(event.session_id)
        except SessionStateError:
            return None  # the corrupt file was reported when the session was first used
        ledger = found.ledger
        found.version += 1
        found.holds.drop(event.call_id)
        found.ledger = msgspec.structs.replace(
            ledger,
            totals=ledger.totals.plus(event),
            by_model={**ledger.by_model, event.model: ledger.by_model.get(event.model, Totals()).plus(event)},
            by_role={**ledger.by_role, event.role: ledger.by_role.get(event.role, Totals()).plus(event)},
        )
        return ledger.totals, found.ledger.totals

    def key_totals(self, key_id: str) -> Totals:
        with self._lock:
            key = self._keys.get(key_id)
            return Totals() if key is None else key.totals

    def reference_cache(self, preset: str, *, entries: int, ttl_s: float) -> ReferenceCache:
        return ReferenceCache(entries=entries, ttl_s=ttl_s)

    def share_quirks(self, quirks: UpstreamQuirks) -> None:
        pass  # one process: its quirks are all there is

    def watch_background(self, response_id: str, finish: Callable[[bytes], None]) -> None:
        pass  # one process: every look at a response comes through it

    def forget_background(self, response_id: str) -> None:
        pass

    async def held_elsewhere(self, response_id: str) -> bool:
        return False

    async def report_background(self, response_id: str, body: bytes) -> None:
        pass

    async def flush(self, timeout: float) -> bool:
        return True  # settled as calls end

    async def aclose(self) -> None:
        pass  # the sidecar sink, the dispatcher's, writes what is pending

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
        # Values must come back from the sidecar's JSON as they are read here.
        changes = json_changes(changes)
        with self._session(session_id) as found:
            self._check_state(session_id, found)
            found.state = {k: v for k, v in {**found.state, **changes}.items() if k not in removed}
            found.version += 1
            for key in (*changes, *removed):
                found.changed[key] = found.version
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
            if found.persist
            and not found.holds.by_call
            and found.budget is None
            and found.written == found.version
            and session_id != keep
        ]
        for session_id in idle[: len(self._sessions) - self.max_sessions]:
            del self._sessions[session_id]

    # -- persisting (the sidecar sink, on the dispatcher's thread) -----------------------------

    def on_change(self, notify: Callable[[str], None]) -> None:
        """`notify(session_id)` is called when a session's state changes without an event."""
        self._on_change = notify

    def pending(self, session_id: str) -> SidecarWrite | None:
        """What to merge into the session's sidecar; None if the file is up to date."""
        with self._lock:
            found = self._sessions.get(session_id)
            path = self.path_for(session_id)
            if found is None or path is None or not found.persist or found.written >= found.version:
                return None
            snapshot = Snapshot(found.ledger, found.state, found.version)
            return SidecarWrite(path, snapshot, found.synced, frozenset(found.changed))

    def written(self, session_id: str, write: SidecarWrite, merged: Snapshot) -> None:
        """The file now holds `merged`: take in what other processes added, keep what changed here
        since `write` was taken."""
        with self._lock:
            found = self._sessions.get(session_id)
            if found is None:
                return
            since = write.snapshot.version
            found.ledger = ledger_plus(merged.ledger, ledger_plus(found.ledger, write.snapshot.ledger, -1))
            found.synced = merged.ledger
            later = {key: version for key, version in found.changed.items() if version > since}
            state = dict(merged.state)
            for key in later:
                if key in found.state:
                    state[key] = found.state[key]
                else:
                    state.pop(key, None)
            found.state, found.changed = state, later
            found.written = max(found.written, since)


def session_id_or_current(session_id: str | None) -> str:
    return current_session() if session_id is None else sanitize_session_id(session_id)
