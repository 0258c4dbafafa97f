"""What a call or a turn records besides its exchange: a Responses request's other fields, a MoA
turn's facts."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class ResponsesRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a Responses API request sent besides its input items (kept for its trace record)."""

    instructions: str | None = None
    tools: list[Any] = []
    previous_response_id: str | None = None

    @classmethod
    def of(cls, payload: dict[str, Any]) -> ResponsesRequest:
        """What `payload`, a Responses request body, sent besides its input (what is not of the
        expected type is left out: the upstream judges it)."""
        instructions, tools, previous = (
            payload.get("instructions"),
            payload.get("tools"),
            payload.get("previous_response_id"),
        )
        return cls(
            instructions=instructions if isinstance(instructions, str) else None,
            tools=tools if isinstance(tools, list) else [],
            previous_response_id=previous if isinstance(previous, str) else None,
        )


class MoaFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a MoA turn adds to its trace record (see `TurnTrace`), and, for one asked through the
    Responses API, what its transcript is kept under (see `_transcripts`)."""

    preset: str
    cadence: Literal["hit", "miss"] | None = None
    aggregator_wait_s: float | None = None
    conversation: list[Any] | None = None
    """The whole conversation as chat messages (a Responses API turn)."""
    served_id: str | None = None
    """The response id the caller was given, when it is not the aggregator's own (a bridged answer)."""
    budget_short: list[Any] = []
    """`BudgetShort` records of the layers the budget could not hold in full."""
    moa_events: list[Any] = []
    """`MoaDecision` records: the turn's fan-out and budget decisions, in order."""
