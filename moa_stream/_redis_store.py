"""The Redis store: sessions shared by every process that names the same Redis and prefix.

Reservations are awaited (a call waits for its hold); settlements, releases and turn counts go
through the outbox (`_redis_outbox`), in order, retried until the store takes them. Holds of calls
still running are renewed well within their lease; background responses held here are handed
their final body when another process sees it (see `_background`). Keys: `_redis_keys`; scripts: `_redis_lua`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec

from ._budget import Budget, BudgetBreach
from ._errors import ConfigError, StoreUnavailable
from ._events import CallUsage, TurnEnd
from ._holds import Hold, ScopeLimits
from ._loop_thread import LoopThread
from ._quirks import UpstreamQuirks
from ._redact import url_without_credentials
from ._redis_cache import SharedReferences
from ._redis_client import connect
from ._redis_keys import FORMAT, Keys, decode_budget, decode_value, ledger_of, limit_name, totals_of
from ._redis_lua import (
    BACKGROUND_FORGET,
    BACKGROUND_HOLD,
    BACKGROUND_REPORT,
    CACHE_GET,
    CACHE_PUT,
    RELEASE,
    RESERVE,
    SETTLE,
    TOTALS,
    TURN,
)
from ._redis_outbox import Outbox
from ._sidecar import SessionLedger
from ._store import Settled, Store, StoreConfig, json_changes
from ._totals import Totals

logger = logging.getLogger("moa_stream")

_QUIRKS_REFRESH_S = 30.0
_BUDGET_FRESH_S = 1.0
"""How long a session budget read serves new turns: another process's change to a session's turn
and soft limits takes effect here within it (its hard session limits, at once)."""
_WATCH_PERIOD_S = 0.25
"""How often a process holding background responses looks for ones other processes saw finished."""
_MAX_BUDGETS = 10_000
T = TypeVar("T")
_encoder = msgspec.json.Encoder()


def open_store(config: StoreConfig) -> Store:
    """The store `config` names (a Redis URL); `ConfigError` when the `redis` extra is missing."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"store={url_without_credentials(config.url)!r} needs the redis client: pip install 'moa-stream[redis]'"
        ) from None
    return RedisStore(config)


class RedisStore:
    """A `Store` on Redis (see the module doc); one per wrapped client, closed with it."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.where = url_without_credentials(config.url)
        self.keys = Keys(config.prefix)
        self._lease_ms = int(config.lease_s * 1000)
        self._idle_ms = int(config.idle_s * 1000)
        self._thread = LoopThread("moa_stream-store")
        self._redis = connect(config)
        self._scripts = {
            name: self._redis.register_script(text)
            for name, text in (
                ("reserve", RESERVE),
                ("settle", SETTLE),
                ("release", RELEASE),
                ("turn", TURN),
                ("cache_get", CACHE_GET),
                ("cache_put", CACHE_PUT),
                ("bg_hold", BACKGROUND_HOLD),
                ("bg_forget", BACKGROUND_FORGET),
                ("bg_report", BACKGROUND_REPORT),
            )
        }
        self._checked = False
        self._blocking: Any = None
        self._budgets: collections.OrderedDict[str, tuple[Budget | None, float]] = collections.OrderedDict()
        """Session budgets as read, and when: a turn's and soft limits come from here."""
        self._warned: set[tuple[str, str]] = set()
        self._open_holds: dict[str, list[str]] = {}
        """Call id to the lease keys of its holds, while its call runs: renewed until settled."""
        self._watched: dict[str, Callable[[bytes], None]] = {}
        """Background responses whose calls this process holds: told the body another process saw."""
        self._quirks: UpstreamQuirks | None = None
        self._quirks_read = 0.0
        self._outbox = Outbox(
            self._redis,
            loop=self._thread.loop,
            where=self.where,
            timeout_s=config.timeout_s,
            before_send=self._check_format,
            tick=self._tick,
            period=lambda: _WATCH_PERIOD_S if self._watched else config.lease_s / 3,
        )
        self._worker = self._thread.submit(self._outbox.run())

    # -- reaching Redis --------------------------------------------------------------------------

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` on the store's loop, bounded in time; `StoreUnavailable` when Redis is not
        there, or not answering."""
        return await self._thread.run(self._bounded(work))

    def _sync_client(self) -> Any:
        """A blocking client for the synchronous public functions (ledger, state, session budgets):
        they run on the caller's thread, also after the store closed, never on its event loop."""
        if self._blocking is None:
            self._blocking = connect(self.config, blocking=True)
        return self._blocking

    def _wait(self, work: Callable[[Any], T]) -> T:
        """`work(client)` with the blocking client; `StoreUnavailable` when Redis is not there."""
        import redis.exceptions

        client = self._sync_client()
        try:
            if not self._checked:
                client.set(self.keys.version(), FORMAT, nx=True)
                self._check_found(client.get(self.keys.version()))
            return work(client)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreUnavailable(self.where, str(exc) or type(exc).__name__) from None

    async def _bounded(self, work: Callable[[], Awaitable[T]]) -> T:
        import redis.exceptions

        try:
            await self._check_format()
            async with asyncio.timeout(self.config.timeout_s):  # no task of its own, unlike wait_for
                return await work()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError, OSError) as exc:
            raise StoreUnavailable(self.where, str(exc) or type(exc).__name__) from None

    def _slow(self) -> float:
        return self.config.timeout_s * 2 + 1

    async def _check_format(self) -> None:
        if self._checked:
            return
        key = self.keys.version()
        await self._redis.set(key, FORMAT, nx=True)
        self._check_found(await self._redis.get(key))

    def _check_found(self, found: Any) -> None:
        key = self.keys.version()
        if found is not None and int(found) != FORMAT:
            raise ConfigError(
                f"the store at {self.where} holds format {int(found)} under {key!r}; this moa_stream writes "
                f"format {FORMAT} (use another prefix, or the version that wrote it)"
            )
        self._checked = True

    # -- sessions ----------------------------------------------------------------------------------

    async def open_session(self, session_id: str) -> None:
        if self._quirks is not None and time.monotonic() - self._quirks_read > _QUIRKS_REFRESH_S:
            self._quirks_read = time.monotonic()
            self._thread.submit(self._read_quirks())
        known = self._budgets.get(session_id)
        if known is not None and time.monotonic() - known[1] < _BUDGET_FRESH_S:
            return  # the session's hard limits are read by every reservation; these serve its turn's
        key = self.keys.session(session_id, "budget")
        try:
            raw = await self._call(lambda: self._redis.get(key))
        except StoreUnavailable:
            return  # the reservation decides what an outage means for this call
        self._budgets[session_id] = (None if raw is None else decode_budget(raw, key), time.monotonic())
        self._budgets.move_to_end(session_id)
        while len(self._budgets) > _MAX_BUDGETS:
            self._budgets.popitem(last=False)

    def session_budget(self, session_id: str) -> Budget | None:
        known = self._budgets.get(session_id)
        return None if known is None else known[0]

    def set_session_budget(self, session_id: str, budget: Budget | None) -> None:
        key = self.keys.session(session_id, "budget")
        if budget is None:
            self._wait(lambda client: client.delete(key))
        else:
            value = _encoder.encode({"v": FORMAT, "budget": budget})
            self._wait(lambda client: client.set(key, value, px=self._idle_ms))
        self._budgets[session_id] = (budget, time.monotonic())

    def ledger(self, session_id: str) -> SessionLedger:
        key = self.keys.scope("session", session_id)[0]
        fields: dict[Any, Any] = self._wait(lambda client: client.hgetall(key))
        return ledger_of(session_id, fields)

    def get_state(self, session_id: str) -> dict[str, Any]:
        key = self.keys.session(session_id, "state")
        raw: dict[Any, Any] = self._wait(lambda client: client.hgetall(key))
        return {name.decode(): decode_value(value, key)["value"] for name, value in raw.items()}

    def update_state(self, session_id: str, changes: dict[str, Any], removed: tuple[str, ...] = ()) -> None:
        changes = json_changes(changes)
        key = self.keys.session(session_id, "state")

        def write(client: Any) -> None:
            with client.pipeline(transaction=True) as pipe:
                if changes:
                    pipe.hset(key, mapping={k: _encoder.encode({"v": FORMAT, "value": v}) for k, v in changes.items()})
                if removed:
                    pipe.hdel(key, *removed)
                pipe.pexpire(key, self._idle_ms)
                pipe.execute()

        self._wait(write)

    def warn_once(self, session_id: str, key: str) -> bool:
        first = (session_id, key) not in self._warned
        self._warned.add((session_id, key))
        return first

    # -- holds and settlements ---------------------------------------------------------------------

    async def reserve(
        self, session_id: str, scopes: Sequence[ScopeLimits], holds: Sequence[Hold]
    ) -> tuple[list[Hold], BudgetBreach | None]:
        keys = [key for scope in scopes for key in self.keys.scope(scope.scope, scope.scope_id)]
        keys.append(self.keys.session(session_id, "budget"))
        args: list[Any] = [0, self._lease_ms, self._idle_ms, len(scopes)]
        for scope in scopes:
            for name in ("cost_usd", "input_tokens", "output_tokens", "total_tokens", "calls"):
                value = getattr(scope.limits, name)
                args.append("" if value is None else repr(value))
        args.append(len(holds))
        for hold in holds:
            a = hold.amounts
            args += [hold.call_id, int(hold.required), a.calls, a.input_tokens, a.output_tokens, repr(a.cost_usd)]

        async def run() -> Any:
            args[0] = int(time.time() * 1000)
            return await self._scripts["reserve"](keys=keys, args=args)

        try:
            ids, breach = await self._call(run)
        except BaseException:
            self.release(session_id, None, [hold.call_id for hold in holds], scopes=scopes)
            raise
        admitted = {raw.decode() for raw in ids}
        leases = keys[2:-1:3]
        for call_id in admitted:
            self._open_holds[call_id] = leases
        found = None
        if breach:
            index, name, threshold, used, held = breach
            scope = scopes[int(index) - 1]
            found = BudgetBreach(
                scope=scope.scope,
                limit=limit_name(name),
                threshold=float(threshold),
                spent=float(used),
                session_id=session_id,
                held=float(held),
                key_id=scope.scope_id if scope.scope == "key" else None,
            )
        return [hold for hold in holds if hold.call_id in admitted], found

    def settle(self, usage: CallUsage, key_id: str | None, then: Settled) -> None:
        scopes = [("session", usage.session_id)] + ([("key", key_id)] if key_id is not None else [])
        keys = [key for kind, scope_id in scopes for key in self.keys.scope(kind, scope_id)]
        keys.append(self.keys.session(usage.session_id, "settled"))
        t = Totals().plus(usage)
        amounts = [getattr(t, name) for name in TOTALS]
        args = [self._idle_ms, len(scopes), usage.call_id, usage.model, usage.role, *map(repr, amounts)]
        self._open_holds.pop(usage.call_id, None)

        def done(result: Any) -> None:
            then((totals_of(result[0]), totals_of(result[1])) if result else None)

        self._post(self._scripts["settle"], keys, args, done)

    def release(
        self,
        session_id: str,
        key_id: str | None,
        call_ids: Sequence[str],
        *,
        scopes: Sequence[ScopeLimits] | None = None,
    ) -> None:
        named = (
            [(scope.scope, scope.scope_id) for scope in scopes]
            if scopes is not None
            else [("session", session_id)] + ([("key", key_id)] if key_id is not None else [])
        )
        keys = [key for kind, scope_id in named for key in self.keys.scope(kind, scope_id)]
        for call_id in call_ids:
            self._open_holds.pop(call_id, None)
        self._post(self._scripts["release"], keys, [len(named), *call_ids], None)

    def record_turn(self, end: TurnEnd) -> None:
        keys = [self.keys.scope("session", end.session_id)[0], self.keys.session(end.session_id, "settled")]
        self._post(self._scripts["turn"], keys, [self._idle_ms, end.turn_id], None)

    def _post(self, script: Any, keys: list[str], args: list[Any], done: Callable[[Any], None] | None) -> None:
        self._outbox.post((script, keys, args, done))

    async def _tick(self) -> None:
        """Renew the leases of this process's open holds; take background responses that other
        processes saw finished."""
        holds = list(self._open_holds.items())
        watched = list(self._watched)
        if not holds and not watched:
            return
        expiry = int(time.time() * 1000) + self._lease_ms
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for call_id, leases in holds:
                    for lease in leases:
                        pipe.zadd(lease, {call_id: expiry}, xx=True)
                if watched:
                    pipe.mget([self.keys.background(rid, done=True) for rid in watched])
                results = await asyncio.wait_for(pipe.execute(), self.config.timeout_s)
        except Exception as exc:  # renewed at the next tick, or they expire
            logger.warning("moa_stream: could not renew holds in the store at %s (%s)", self.where, exc)
            return
        for response_id, body in zip(watched, results[-1] if watched else [], strict=True):
            finish = self._watched.get(response_id)
            if body is not None and finish is not None:
                finish(bytes(body))

    # -- background responses ----------------------------------------------------------------------

    def watch_background(self, response_id: str, finish: Callable[[bytes], None]) -> None:
        self._watched[response_id] = finish
        self._post(self._scripts["bg_hold"], [self.keys.background(response_id)], [self._idle_ms], None)

    def forget_background(self, response_id: str) -> None:
        if self._watched.pop(response_id, None) is not None:
            keys = [self.keys.background(response_id), self.keys.background(response_id, done=True)]
            self._post(self._scripts["bg_forget"], keys, [], None)

    async def held_elsewhere(self, response_id: str) -> bool:
        key = self.keys.background(response_id)
        try:
            return bool(await self._call(lambda: self._redis.exists(key)))
        except StoreUnavailable:
            return False

    async def report_background(self, response_id: str, body: bytes) -> None:
        keys = [self.keys.background(response_id), self.keys.background(response_id, done=True)]
        script = self._scripts["bg_report"]
        try:
            await self._call(lambda: script(keys=keys, args=[body, self._idle_ms]))
        except StoreUnavailable as exc:  # the holder ends it at close, as closed_early
            logger.warning("moa_stream: a finished background response could not be handed over (%s)", exc)

    # -- shared caches -----------------------------------------------------------------------------

    def reference_cache(self, preset: str, *, entries: int, ttl_s: float) -> SharedReferences:
        run = self._call
        return SharedReferences(
            run, self._scripts["cache_get"], self._scripts["cache_put"], self.keys, preset=preset, ttl_s=ttl_s
        )

    def share_quirks(self, quirks: UpstreamQuirks) -> None:
        self._quirks = quirks
        key = self.keys.quirks()

        def learned(field: str, value: str) -> None:
            self._thread.submit(self._quietly(self._redis.hset(key, field, value)))

        quirks.on_learn = learned

    async def _read_quirks(self) -> None:
        raw: dict[Any, Any] = await self._quietly(self._redis.hgetall(self.keys.quirks())) or {}
        if self._quirks is not None:
            self._quirks.absorb({k.decode(): v.decode() for k, v in raw.items()})

    async def _quietly(self, work: Awaitable[T]) -> T | None:
        try:
            return await asyncio.wait_for(work, self.config.timeout_s)
        except Exception as exc:
            logger.debug("moa_stream: store at %s: %s", self.where, exc)
            return None

    async def flush(self, timeout: float) -> bool:
        if self._outbox.closing:
            return not self._outbox
        return await self._thread.run(self._outbox.drained(timeout))

    async def aclose(self) -> None:
        """Send what the outbox holds (bounded by the store's timeout, a few times over), then close."""
        if self._outbox.closing:
            return
        self._outbox.close()
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._worker), self._slow() * 3)
        except TimeoutError:
            logger.error(
                "moa_stream: the store at %s is unavailable; %d settlements were not recorded",
                self.where,
                len(self._outbox),
            )
            self._worker.cancel()
        try:
            await self._thread.run(self._redis.aclose())
        finally:
            self._thread.stop()
            if self._blocking is not None:
                self._blocking.close()
                self._blocking = None  # a later read opens another
