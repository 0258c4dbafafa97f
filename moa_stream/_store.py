"""The store: what sessions accumulate, behind one interface with two implementations.

`MemoryStore` (`_ledger`) is the embedded default: one process, sidecar files with a trace
directory. `RedisStore` (`_redis_store`) shares it all between processes: ledger totals, session
state, budget holds and settlements, per-session budgets, the MoA reference cache and learned
upstream quirks. Both apply the same rules (`_holds`), and the same tests run on both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import msgspec

from ._budget import Budget, BudgetBreach
from ._cadence import CachedReferences
from ._checks import Where, check_table_keys
from ._errors import ConfigError
from ._events import CallUsage, TurnEnd
from ._holds import Hold, ScopeLimits
from ._quirks import UpstreamQuirks
from ._sidecar import SessionLedger
from ._totals import Totals

Settled = Callable[[tuple[Totals, Totals] | None], None]
"""Told a settled call's session totals before and after (None when they are not known)."""

DEFAULT_LEASE_S = 60.0
DEFAULT_IDLE_S = 7 * 24 * 3600.0
DEFAULT_PREFIX = "moa"


class StoreConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where sessions are kept when several processes share them (`wrap(store=...)`, `[store]`).

    Only Redis URLs are supported (`redis://`, `rediss://`, `unix://`); the client is redis-py, in
    the `redis` extra. Credentials belong in the URL or the environment, never in the store.
    """

    url: str
    prefix: str = DEFAULT_PREFIX
    """Every key starts with `<prefix>:`, so several deployments can share one Redis."""
    lease_s: float = DEFAULT_LEASE_S
    """How long a hold outlives its process: a crashed replica's holds expire after it. Holds of
    calls still running are renewed well before."""
    idle_s: float = DEFAULT_IDLE_S
    """A session untouched for this long is removed from the store."""
    unavailable: Literal["closed", "open"] | None = None
    """When the store cannot be reached: `closed` refuses calls with a 503 naming the store; `open`
    sends them, meters them locally and settles them once the store is back. The default is
    `closed` when hard limits exist, else `open`."""
    timeout_s: float = 2.0
    """How long one store operation may take before the store counts as unreachable."""


_SCHEMES = ("redis://", "rediss://", "unix://")


def validate_store(store: object, *, source: str = "store=", url_optional: bool = False) -> StoreConfig:
    """A `StoreConfig` (or a URL for one) checked field by field; `ConfigError` names the field.
    `url_optional`: a `[store]` table may leave its url to `store=` or `serve --store`."""
    if isinstance(store, str):
        store = StoreConfig(url=store)
    if not isinstance(store, StoreConfig):
        raise ConfigError(f"{source}: expected a Redis URL or a moa_stream.StoreConfig, got {type(store).__name__}")
    if not isinstance(store.url, str) or (not store.url.startswith(_SCHEMES) and not (url_optional and not store.url)):
        raise ConfigError(f"{source}: field 'url': expected a redis://, rediss:// or unix:// URL, got {store.url!r}")
    if not isinstance(store.prefix, str) or not store.prefix or any(c.isspace() for c in store.prefix):
        raise ConfigError(f"{source}: field 'prefix': expected a non-empty string without spaces, got {store.prefix!r}")
    for name in ("lease_s", "idle_s", "timeout_s"):
        value = getattr(store, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
            raise ConfigError(f"{source}: field {name!r}: expected a number of seconds above 0, got {value!r}")
    if store.unavailable not in (None, "closed", "open"):
        raise ConfigError(f"{source}: field 'unavailable': expected 'closed' or 'open', got {store.unavailable!r}")
    return store


def store_from_toml(source: str, table: object) -> StoreConfig:
    """The `[store]` table of a moa.toml."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: 'store' must be a table with a url, got {table!r}")
    fields = {name: None for name in StoreConfig.__struct_fields__}
    check_table_keys(Where(source), "store", table, fields, required=())
    try:
        config = StoreConfig(**{"url": "", **table})
    except TypeError as exc:
        raise ConfigError(f"{source}: [store]: {exc}") from None
    return validate_store(config, source=f"{source}: [store]", url_optional=True)


class ReferenceStore(Protocol):
    """A preset's reference cache, keyed by preset, session and user turn (see `_cadence`)."""

    async def get(self, key: str, *, every_n: int | None) -> CachedReferences | None: ...

    async def put(self, key: str, value: CachedReferences) -> None: ...


class Store(Protocol):
    """What the engine needs of a store; every method names what it reads or changes."""

    where: str
    """`memory`, or the store's URL without credentials (named in errors)."""

    async def open_session(self, session_id: str) -> None:
        """Make the session ready for calls (read its sidecar, its stored budget)."""

    def session_budget(self, session_id: str) -> Budget | None:
        """The session's own budget as last read, which replaces the client's for it."""

    def set_session_budget(self, session_id: str, budget: Budget | None) -> None: ...

    async def reserve(
        self, session_id: str, scopes: Sequence[ScopeLimits], holds: Sequence[Hold]
    ) -> tuple[list[Hold], BudgetBreach | None]:
        """Atomically check `holds` against every scope's settled totals and open holds and add
        the ones admitted (see `_holds.admit_group`); the session scope's limits are the session's
        own budget's when it has one."""

    def settle(self, usage: CallUsage, key_id: str | None, then: Settled) -> None:
        """Replace the call's hold by its usage, once per call id; never raises. `then` is told the
        session's totals before and after, at once or when the store has them."""

    def release(self, session_id: str, key_id: str | None, call_ids: Sequence[str]) -> None:
        """Give back holds of calls that never started."""

    def record_turn(self, end: TurnEnd) -> None: ...

    def warn_once(self, session_id: str, key: str) -> bool:
        """True the first time `key` is asked for the session (in this process), False after."""

    def ledger(self, session_id: str) -> SessionLedger: ...

    def get_state(self, session_id: str) -> dict[str, Any]: ...

    def update_state(self, session_id: str, changes: dict[str, Any], removed: tuple[str, ...] = ()) -> None: ...

    def reference_cache(self, preset: str, *, entries: int, ttl_s: float) -> ReferenceStore: ...

    async def flush(self, timeout: float) -> bool:
        """Wait until what was settled so far is in the store; False if that took over `timeout`."""

    def share_quirks(self, quirks: UpstreamQuirks) -> None:
        """Keep `quirks` in step with what other processes learned."""

    def watch_background(self, response_id: str, finish: Callable[[bytes], None]) -> None:
        """This process holds the call of background response `response_id`: `finish(body)` when
        another process saw the response finished."""

    def forget_background(self, response_id: str) -> None: ...

    async def held_elsewhere(self, response_id: str) -> bool:
        """Whether another process holds the call of `response_id`."""

    async def report_background(self, response_id: str, body: bytes) -> None:
        """Hand a finished response's body to the process that holds its call."""

    async def aclose(self) -> None: ...


class SessionState:
    """A session's own key-value store (last write wins), kept in the store (a sidecar file in
    the embedded default, Redis when shared), never in traces.

    Values must be JSON. Get one with `moa_stream.session_state(client)`.
    """

    def __init__(self, store: Store, session_id: str) -> None:
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


_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(dict[str, Any])


def json_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` as a read from JSON gives them back (a tuple becomes a list), after refusing what
    JSON would not give back at all, before anything changes."""
    for key, value in changes.items():
        check_json(value, f"session state {key!r}")
    return _state_decoder.decode(_encoder.encode(changes))


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
