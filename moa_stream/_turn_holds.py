"""A turn's holds: reserved before its calls start, ahead for a MoA layer, given back when unused.

The turn's own limits are checked here, against what the turn settled and holds; the session's
and the API key's by the store, through the turn's owner. Holds taken here count for sibling
calls before the store has answered, so two references of one turn never both pass a check that
only one of them fits.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from ._budget import BudgetPolicy
from ._errors import Refusal
from ._holds import NO_AMOUNTS, Amounts, Hold, ScopeLimits, admit_group, refusal, worst_case
from ._ids import new_id
from ._totals import Totals


class HoldingTurn(Protocol):
    """What the holds need of their turn."""

    owner: Any
    """The turn's `_meter.Owner`: its `prices`, `reserve()` and `release()`."""
    session_id: str
    policy: BudgetPolicy | None
    weighs: bool

    def settled(self) -> Totals: ...


class TurnHolds:
    """The holds of one turn's calls: in flight, and reserved ahead of calls not started yet."""

    __slots__ = ("_held", "_hold_of", "_lock", "_planned")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = NO_AMOUNTS
        self._hold_of: dict[str, Amounts] = {}
        """Holds of calls reserved and not ended, by call id."""
        self._planned: dict[str, Hold] = {}
        """Holds reserved ahead (a MoA layer's) whose calls have not started, by call id."""

    @staticmethod
    def hold_for(
        turn: HoldingTurn,
        *,
        model: str,
        input_messages: list[Any],
        max_output_tokens: int | None = None,
        required: bool = True,
        label: str = "",
        extra_input_tokens: int = 0,
        weigh: bool = False,
    ) -> Hold:
        """A new call's hold: its worst case when some limit weighs tokens or cost (or `weigh`
        asks for it), else one call."""
        call_id = new_id()
        if not (turn.weighs or weigh):
            return Hold(call_id=call_id, amounts=Amounts(calls=1), required=required, label=label)
        return worst_case(
            call_id,
            model=model,
            input_messages=input_messages,
            max_output_tokens=max_output_tokens,
            prices=turn.owner.prices,
            required=required,
            label=label,
            extra_input_tokens=extra_input_tokens,
        )

    async def reserve(self, turn: HoldingTurn, holds: Sequence[Hold]) -> tuple[list[Hold], Refusal | None]:
        """Reserve `holds` ahead of their calls (see `_holds.admit_group`): against the turn's own
        limits here, then the session's and the API key's in the store. The admitted ones are the
        turn's until their calls start (`started`) or the turn gives them back (`release_planned`)."""
        limits = turn.policy.budget.turn if turn.policy is not None else None
        scope = ScopeLimits("turn", "", limits) if limits is not None and limits.items() else None
        with self._lock:
            if scope is None:
                admitted, breach = list(holds), None
            else:
                totals, held = turn.settled(), self._held
                admitted, breach = admit_group(
                    holds, lambda adding: refusal(scope, totals, held, adding, session_id=turn.session_id)
                )
            self._take(admitted)
        if not admitted:
            return [], breach
        try:
            stored, store_breach = await turn.owner.reserve(turn, admitted)
        except Refusal as refused:
            self._give_back(admitted)
            return [], refused
        except BaseException:
            self._give_back(admitted)
            turn.owner.release(turn, [hold.call_id for hold in admitted])
            raise
        kept = {hold.call_id for hold in stored}
        self._give_back([hold for hold in admitted if hold.call_id not in kept])
        with self._lock:
            self._planned.update((hold.call_id, hold) for hold in stored)
        return stored, breach or store_breach

    async def admit(
        self, turn: HoldingTurn, model: str, input_messages: list[Any], max_output_tokens: int | None
    ) -> Hold:
        """Reserve one call's hold now, or raise the `Refusal` that refuses it."""
        wanted = self.hold_for(turn, model=model, input_messages=input_messages, max_output_tokens=max_output_tokens)
        admitted, refused = await self.reserve(turn, [wanted])
        if not admitted:
            assert refused is not None  # one required hold: admitted, or refused with a reason
            raise refused
        return admitted[0]

    def planned(self, hold: Hold) -> bool:
        return hold.call_id in self._planned

    def started(self, hold: Hold) -> None:
        with self._lock:
            self._planned.pop(hold.call_id, None)

    def ended(self, call_id: str) -> None:
        with self._lock:
            self._drop(call_id)

    def release_planned(self, turn: HoldingTurn) -> None:
        """Give back the holds reserved ahead for calls that did not start."""
        with self._lock:
            left, self._planned = list(self._planned.values()), {}
        if left:
            self._give_back(left)
            turn.owner.release(turn, [hold.call_id for hold in left])

    def _take(self, holds: list[Hold]) -> None:
        for hold in holds:
            self._hold_of[hold.call_id] = hold.amounts
            self._held = self._held.plus(hold.amounts)

    def _give_back(self, holds: list[Hold]) -> None:
        with self._lock:
            for hold in holds:
                self._drop(hold.call_id)

    def _drop(self, call_id: str) -> None:
        amounts = self._hold_of.pop(call_id, None)
        if amounts is not None:
            self._held = self._held.minus(amounts) if self._hold_of else NO_AMOUNTS
