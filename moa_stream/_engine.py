"""The engine: the one owner of everything a wrapped client shares.

Sinks and their thread, the trace writer, the session store and budget policy, the presets with
their reference caches and slot clients, learned upstream quirks, and what is in flight (calls,
turns, tail readers). It is open until `aclose()`, which ends what is in flight, delivers every
event and closes what it owns, once; after that it refuses new turns. Transports hold the engine
and nothing else of it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

import anyio

from ._background import BackgroundResponses
from ._budget import Budget, BudgetBreach, BudgetPolicy, Limits
from ._dispatch import DEFAULT_SINK_BUFFER, Dispatcher, Sink, SinkStats
from ._errors import ClientClosedError, StoreUnavailable
from ._events import CallUsage, TraceContext, TurnEnd, TurnTrace
from ._holds import Hold, ScopeLimits
from ._ledger import MemoryStore
from ._meter import Call, Turn
from ._presets import Preset
from ._pricing import PriceTable
from ._quirks import UpstreamQuirks
from ._redact import Redactor
from ._sidecar import SessionChanged, SidecarWriter
from ._slots import DEFAULT_UPSTREAM_CONCURRENCY, SlotUpstreams
from ._store import Store
from ._totals import Totals
from ._trace_context import trace_headers
from ._traces import TraceWriter
from ._transcripts import Transcripts

_SIDECAR_SINK = "session_store"


_NO_LIMITS = Limits()


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Engine:
    """Everything one wrapped client (and its `with_options()` copies) shares; see the module doc."""

    def __init__(
        self,
        *,
        prices: PriceTable,
        sinks: Iterable[Sink] = (),
        trace_dir: str | os.PathLike[str] | None = None,
        sink_buffer: int = DEFAULT_SINK_BUFFER,
        drain_timeout: float = 10.0,
        redactor: Redactor | None = None,
        budget: Budget | None = None,
        presets: Mapping[str, Preset] | None = None,
        upstream_concurrency: int = DEFAULT_UPSTREAM_CONCURRENCY,
        store: Store | None = None,
        store_unavailable: str | None = None,
        propagate_trace: bool = False,
    ) -> None:
        if drain_timeout <= 0:
            raise ValueError(f"drain_timeout must be positive, got {drain_timeout!r}")
        self.prices = prices
        self.drain_timeout = drain_timeout
        self.redactor = redactor
        self.quirks = UpstreamQuirks()
        self.background = BackgroundResponses()
        self.transcripts = Transcripts()
        self.presets = dict(presets or {})
        self.slots = SlotUpstreams(upstream_concurrency=upstream_concurrency)
        self.policy = BudgetPolicy(budget) if budget is not None else None
        self.dispatcher = Dispatcher(buffer=sink_buffer)
        self.trace_writer = TraceWriter(trace_dir) if trace_dir is not None else None
        if self.trace_writer is not None:
            self.dispatcher.add_sink(self.trace_writer, name="trace_writer")
        if store is None:
            # A budget with session limits cannot go on from zero when a session's totals are unreadable.
            memory = MemoryStore(
                self.trace_writer.directory if self.trace_writer else None,
                fail_on_corrupt=self.policy is not None and self.policy.limits_sessions,
            )
            if self.trace_writer is not None:
                self.dispatcher.add_sink(SidecarWriter(memory.pending, memory.written), name=_SIDECAR_SINK)
                memory.on_change(
                    lambda session_id: self.dispatcher.offer_to(_SIDECAR_SINK, SessionChanged(session_id=session_id))
                )
            store = memory
        self.store: Store = store
        self.shared_store = not isinstance(store, MemoryStore)
        """Other processes share the store (their session budgets apply here too)."""
        self.store_unavailable = store_unavailable
        """`closed` or `open` (see `StoreConfig.unavailable`); None: closed when hard limits exist."""
        store.share_quirks(self.quirks)
        self.background.forget = store.forget_background
        self.caches = {
            name: store.reference_cache(name, entries=preset.cache_entries, ttl_s=preset.cache_ttl_s)
            for name, preset in self.presets.items()
        }
        self.propagate_trace = propagate_trace
        """Send the caller's trace context upstream (`traceparent`, `tracestate`)."""
        self.wants_trace_context = propagate_trace
        """Read the caller's trace context as turns start: for `propagate_trace`, or a sink that
        builds spans (one with a true `wants_trace_context`, such as `OTelSink`)."""
        for sink in sinks:
            self.add_sink(sink)
        self.key_limits: dict[str, Limits] = {}
        """Limits per API key id (`serve --keys`), over all of that key's sessions."""
        self.origin: object = None
        """The client that was wrapped, kept alive because collecting it would close the shared pool."""
        self._state = _State.OPEN
        # Sets rather than weak sets: a call or turn leaves when it ends, and close ends the rest.
        self._open_calls: set[Call] = set()
        self._open_turns: set[Turn] = set()
        self._tails: set[asyncio.Task[None]] = set()

    def set_key_limits(self, key_id: str, limits: Limits | None) -> None:
        """Limit what the calls of API key `key_id` (the `x-moa-key` header) may use over all its
        sessions; None removes the limit."""
        if limits is None or not limits.items():
            self.key_limits.pop(key_id, None)
        else:
            self.key_limits[key_id] = limits

    # -- sinks -----------------------------------------------------------------------------------

    def add_sink(self, sink: Sink, *, name: str | None = None, buffer: int | None = None) -> None:
        self.dispatcher.add_sink(sink, name=name, buffer=buffer)
        self.wants_trace_context = self.wants_trace_context or getattr(sink, "wants_trace_context", False) is True

    def sink_stats(self) -> list[SinkStats]:
        return self.dispatcher.stats()

    async def flush(self) -> bool:
        # The store first: its settlements can still emit warnings for the sinks.
        settled = await self.store.flush(self.drain_timeout)
        return await self.dispatcher.flush(self.drain_timeout) and settled

    def emit(self, event: Any) -> None:
        """Report a progress event (the engine's own records go through `call_ended`/`turn_ended`)."""
        self.dispatcher.offer(event)

    # -- turns and calls (the `Owner` of `_meter`) -----------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state is _State.OPEN

    async def open_session(self, session_id: str) -> None:
        """Make the session ready for a turn, off the caller's event loop (`SessionStateError` for
        a sidecar a budget needs and cannot read)."""
        await self.store.open_session(session_id)

    def new_turn(
        self, *, session_id: str, model: str, key_id: str | None = None, parent: TraceContext | None = None
    ) -> Turn:
        """A new turn (`ClientClosedError` once the client is closed); `parent` is the caller's trace
        context when the engine `wants_trace_context`."""
        if self._state is not _State.OPEN:
            raise ClientClosedError("moa_stream: the client is closed")
        own = self.store.session_budget(session_id)
        policy = BudgetPolicy(own) if own is not None else self.policy
        key_limits = self.key_limits.get(key_id) if key_id is not None else None
        weighs = (
            self.shared_store
            or (policy is not None and policy.weighs)
            or (key_limits is not None and any(name != "calls" for name, _ in key_limits.items()))
        )
        turn = Turn(
            self, session_id=session_id, model=model, key_id=key_id, policy=policy, weighs=weighs, parent=parent
        )
        if self.propagate_trace:
            turn.upstream_headers = trace_headers(parent)
        self._open_turns.add(turn)
        return turn

    async def reserve(self, turn: Turn, holds: list[Hold]) -> tuple[list[Hold], BudgetBreach | None]:
        policy = turn.policy
        scopes = [ScopeLimits("session", turn.session_id, policy.budget.session if policy is not None else _NO_LIMITS)]
        key_limits = self.key_limits.get(turn.key_id) if turn.key_id is not None else None
        if key_limits is not None:
            scopes.append(ScopeLimits("key", turn.key_id or "", key_limits))
        try:
            return await self.store.reserve(turn.session_id, scopes, holds)
        except StoreUnavailable:
            if self._fails_open(policy, key_limits):
                return list(holds), None  # metered as always; the store settles them once it is back
            raise

    def _fails_open(self, policy: BudgetPolicy | None, key_limits: Limits | None) -> bool:
        if self.store_unavailable is not None:
            return self.store_unavailable == "open"
        return not (key_limits is not None or (policy is not None and policy.hard))

    def release(self, turn: Turn, call_ids: list[str]) -> None:
        self.store.release(turn.session_id, turn.key_id, call_ids)

    def call_started(self, call: Call) -> None:
        self._open_calls.add(call)

    def call_ended(self, call: Call, usage: CallUsage, turn: tuple[Totals, Totals]) -> None:
        self._open_calls.discard(call)
        policy = call.turn.policy
        self.dispatcher.offer(usage)
        if policy is None:
            self.store.settle(usage, call.turn.key_id, _ignore)
            return

        def settled(session: tuple[Totals, Totals] | None) -> None:
            if session is None:
                return
            first_unpriced = policy.watches_unpriced(usage) and self.store.warn_once(usage.session_id, "cost_unknown")
            for warning in policy.warnings(usage, session, turn, first_unpriced=first_unpriced):
                self.dispatcher.offer(warning)

        self.store.settle(usage, call.turn.key_id, settled)

    def hold_background(self, call: Call) -> None:
        self.background.hold(call)
        response_id = call.buffer.response_id
        if call.held and response_id is not None:
            self.store.watch_background(response_id, functools.partial(self.background.finish_with, response_id))

    def end_abandoned(self, call: Call) -> None:
        """End `call` as `closed_early` on the sink thread, for a finalizer: the collector can run
        one at any allocation, also while this thread holds the lock of the call's own turn, which
        an end here would wait for forever. Ended at once where there is no sink thread to run it."""
        end = functools.partial(call.end, "closed_early")
        if not self.dispatcher.run_soon(end):
            end()

    def turn_ended(self, turn: Turn, end: TurnEnd, trace: TurnTrace) -> None:
        self._open_turns.discard(turn)
        moa = turn.moa
        if moa is not None and moa.conversation is not None and end.status == "completed":
            answer = next((record for record in reversed(trace.calls) if record.role == "aggregator"), None)
            served = moa.served_id or (answer.response_id if answer is not None else None)
            if answer is not None and served is not None:
                self.transcripts.record(served, moa.conversation, answer.output)
        self.store.record_turn(end)
        self.dispatcher.offer(end)
        self.dispatcher.offer(trace)

    # -- work off the caller's path ----------------------------------------------------------------

    def finish_later(self, work: Coroutine[Any, Any, None], *, fallback: Callable[[], None]) -> bool:
        """Run `work` (which must be bounded in time) in a task this engine owns on the caller's
        event loop, so that the caller need not wait for it; `close()` waits for it. False, with
        `work` discarded, when that cannot be (the engine is closing, or the loop is not asyncio's):
        the caller then finishes at once. `fallback` runs after the task in any case, even one
        cancelled before it started, so nothing `work` had to finish is left unfinished."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._state is not _State.OPEN:
            work.close()
            return False
        task = loop.create_task(work)
        self._tails.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tails.discard(task)
            fallback()

        task.add_done_callback(done)
        return True

    # -- closing -----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """End what is still in flight, deliver every event and trace line, close the slots' own
        clients, then stop the sink thread. Idempotent; shielded from cancellation.

        Tail readers finish (each is bounded), every call still open ends as `closed_early`, and
        every turn still running ends; their events reach the sinks before this returns.
        """
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSING
        with anyio.CancelScope(shield=True):
            await self._finish_tails()
            for call in list(self._open_calls):
                held, call.held = call.held, False
                if held and call.buffer.response_id is not None:
                    self.store.forget_background(call.buffer.response_id)  # no other process hands it here
                call.end("closed_early", "the client closed before its background response finished" if held else None)
            for turn in list(self._open_turns):
                turn.cut_short()
            self._state = _State.CLOSED
            await self.slots.aclose()
            await self.store.aclose()  # settles what is pending, before the sinks stop
            await self.dispatcher.aclose(self.drain_timeout)

    async def _finish_tails(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        ours = [task for task in self._tails if task.get_loop() is loop]
        if ours:
            await asyncio.wait(ours)


def _ignore(session: tuple[Totals, Totals] | None) -> None:
    pass
