"""A sink for people: one short line per event, on stderr, so that the answer on stdout stays
readable (`sinks=[moa_stream.print_events]`)."""

from __future__ import annotations

import sys
from typing import TextIO

from ._events import (
    Aggregating,
    BudgetWarning,
    CallUsage,
    Event,
    ReferenceDone,
    ReferenceStarted,
    TurnEnd,
    TurnTrace,
)


def print_events(event: Event, *, file: TextIO | None = None) -> None:
    """Write one line about `event` to `file` (stderr by default). A sink: give it as
    `sinks=[moa_stream.print_events]`; it runs on a sink thread of its own, never in your stream."""
    line = describe(event)
    if line:
        print(line, file=file if file is not None else sys.stderr, flush=True)


def describe(event: Event) -> str:
    """The line `print_events` writes for `event` ("" for none)."""
    if isinstance(event, CallUsage):
        cost = "" if event.cost_usd is None else f"  ${event.cost_usd:.6f}"
        ttft = "" if event.ttft_s is None else f"  first token {event.ttft_s:.2f}s"
        why = f"  ({event.error})" if event.error else ""
        return (
            f"[call] {event.role} {event.label or event.model}: {event.status}, "
            f"{event.input_tokens or 0} in / {event.output_tokens or 0} out tokens{cost}{ttft}  "
            f"{event.duration_s:.2f}s{why}"
        )
    if isinstance(event, TurnEnd):
        cost = f"  ${event.cost_usd:.6f}" if event.cost_complete else f"  at least ${event.cost_usd:.6f}"
        why = f"  ({event.error})" if event.error else ""
        return (
            f"[turn] {event.model}: {event.status}, {event.calls} call{'s' * (event.calls != 1)}, "
            f"{event.input_tokens} in / {event.output_tokens} out tokens{cost}  {event.duration_s:.2f}s{why}"
        )
    if isinstance(event, ReferenceStarted):
        return f"[moa:{event.preset}] layer {event.layer}: {event.label} started ({event.model})"
    if isinstance(event, ReferenceDone):
        return (
            f"[moa:{event.preset}] layer {event.layer}: {event.label} {event.status} ({event.done}/{event.total} done)"
        )
    if isinstance(event, Aggregating):
        cached = " (cached references)" if event.cadence == "hit" else ""
        return (
            f"[moa:{event.preset}] aggregating with {event.model}: "
            f"{event.references_used}/{event.references_total} references{cached}"
        )
    if isinstance(event, BudgetWarning):
        return f"[budget] {event.message}"
    if isinstance(event, TurnTrace):
        return ""  # everything it holds is in the lines above; read it with `moa-stream traces`
    return f"[{type(event).__name__}]"
