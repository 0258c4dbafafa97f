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
from ._budget import Budget, BudgetPolicy, Limits
from ._cadence import ReferenceCache
from ._dispatch import DEFAULT_SINK_BUFFER, Dispatcher, Sink, SinkStats
from ._errors import ClientClosedError
from ._events import CallUsage, TurnEnd, TurnTrace
from ._ledger import SessionStore
from ._meter import Call, Turn
from ._presets import Preset
from ._pricing import PriceTable
from ._quirks import UpstreamQuirks
from ._redact import Redactor
from ._sidecar import SessionChanged, SidecarWriter
from ._slots import DEFAULT_UPSTREAM_CONCURRENCY, SlotUpstreams
from ._totals import Totals
from ._traces import TraceWriter
from ._transcripts import Transcripts

_SIDECAR_SINK = "session_store"


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
        self.caches = {
            name: ReferenceCache(entries=preset.cache_entries, ttl_s=preset.cache_ttl_s)
            for name, preset in self.presets.items()
        }
        self.slots = SlotUpstreams(upstream_concurrency=upstream_concurrency)
        self.policy = BudgetPolicy(budget) if budget is not None else None
        self.dispatcher = Dispatcher(buffer=sink_buffer)
        self.trace_writer = TraceWriter(trace_dir) if trace_dir is not None else None
        # A budget with session limits cannot go on from zero when a session's totals are unreadable.
        self.sessions = SessionStore(
            self.trace_writer.directory if self.trace_writer else None,
            fail_on_corrupt=self.policy is not None and self.policy.limits_sessions,
        )
        if self.trace_writer is not None:
            self.dispatcher.add_sink(self.trace_writer, name="trace_writer")
            self.dispatcher.add_sink(SidecarWriter(self.sessions.pending, self.sessions.written), name=_SIDECAR_SINK)
            self.sessions.on_change(
                lambda session_id: self.dispatcher.offer_to(_SIDECAR_SINK, SessionChanged(session_id=session_id))
            )
        for sink in sinks:
            self.dispatcher.add_sink(sink)
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

    def sink_stats(self) -> list[SinkStats]:
        return self.dispatcher.stats()

    async def flush(self) -> bool:
        return await self.dispatcher.flush(self.drain_timeout)

    def emit(self, event: Any) -> None:
        """Report a progress event (the engine's own records go through `call_ended`/`turn_ended`)."""
        self.dispatcher.offer(event)

    # -- turns and calls (the `Owner` of `_meter`) -----------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state is _State.OPEN

    async def open_session(self, session_id: str) -> None:
        """Read the session's sidecar, if it is not in memory yet, in a worker thread: the first
        request of a session never blocks the caller's event loop on the disk."""
        if not self.sessions.is_loaded(session_id):
            await anyio.to_thread.run_sync(self.sessions.load, session_id)

    def new_turn(self, *, session_id: str, model: str) -> Turn:
        """A new turn (`ClientClosedError` once the client is closed)."""
        if self._state is not _State.OPEN:
            raise ClientClosedError("moa_stream: the client is closed")
        self.sessions.ledger(session_id)  # a corrupt sidecar a budget needs raises SessionStateError here
        turn = Turn(self, session_id=session_id, model=model)
        self._open_turns.add(turn)
        return turn

    def admit(self, call: Call, turn_totals: Totals, turn_started: int) -> None:
        policy = self.policy
        session_id = call.turn.session_id
        refusal = (
            None
            if policy is None
            else lambda totals, started: policy.refusal(session_id, totals, started, turn_totals, turn_started)
        )
        self.sessions.admit(session_id, refusal)
        self._open_calls.add(call)

    def call_ended(self, call: Call, usage: CallUsage, turn: tuple[Totals, Totals]) -> None:
        self._open_calls.discard(call)
        session = self.sessions.record(usage)
        self.dispatcher.offer(usage)
        policy = self.policy
        if policy is not None and session is not None:
            first_unpriced = policy.watches_unpriced(usage) and self.sessions.warn_once(
                usage.session_id, "cost_unknown"
            )
            for warning in policy.warnings(usage, session, turn, first_unpriced=first_unpriced):
                self.dispatcher.offer(warning)

    def hold_background(self, call: Call) -> None:
        self.background.hold(call)

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
        self.sessions.record(end)
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
                call.end("closed_early", "the client closed before its background response finished" if held else None)
            for turn in list(self._open_turns):
                turn.cut_short()
            self._state = _State.CLOSED
            await self.slots.aclose()
            await self.dispatcher.aclose(self.drain_timeout)

    async def _finish_tails(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        ours = [task for task in self._tails if task.get_loop() is loop]
        if ours:
            await asyncio.wait(ours)
