"""How calls and turns ended, in the words events use: the worst status of a turn's calls, a reason on
one line, and where a call's recorded output came from."""

from __future__ import annotations

from ._events import CallStatus, CallUsage, OutputSource

MAX_ERROR_CHARS = 1000
"""The longest reason a `TurnEnd` carries."""


def one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 1] + "…"


def worst(usages: list[CallUsage]) -> CallStatus:
    for status in ("error", "cancelled", "closed_early"):
        if any(u.status == status for u in usages):
            return status
    return "completed"


def output_source(streamed: bool, status: CallStatus, has_output: bool) -> OutputSource:
    if not has_output:
        return "none"
    if not streamed:
        return "inline"
    return "inline_from_stream" if status == "completed" else "partial_stream"
