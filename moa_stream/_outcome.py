"""How calls and turns ended, in the words events use: the worst status of a turn's calls, a reason on
one line, and where a call's recorded output came from."""

from __future__ import annotations

import anyio

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


def turn_outcome(
    main: CallUsage | None, usages: list[CallUsage], reason: str | None, *, cut: bool
) -> tuple[CallStatus, str | None]:
    """A turn's status, and for an `error` its one-line reason: the main call's (the one the
    caller got), else `reason` (a refusal, a bad request) makes it an error, else the worst of its
    calls (`closed_early` when the client closed it, `cut`)."""
    if main is not None:
        status = main.status
    elif reason is not None:
        status = "error"
    else:
        status = "closed_early" if cut else worst(usages)
    if status != "error":
        return status, None
    if reason is None and main is not None:
        reason = main.error
    if reason is None:
        reason = next((u.error for u in usages if u.error), None) or "no call of the turn succeeded"
    return status, one_line(reason)


def interruption(exc: BaseException, deadline: tuple[float, float] | None) -> tuple[CallStatus, str | None]:
    """The status of a call that `exc` interrupted: its own timeout (a cancellation at or after
    its `deadline`, anyio time and seconds) is an error, any other cancellation is `cancelled`, a
    generator closed by its consumer is `closed_early`."""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        if deadline is not None and anyio.current_time() >= deadline[0]:
            return "error", f"timed out after {deadline[1]:g}s"
        return "cancelled", None
    if isinstance(exc, GeneratorExit):
        return "closed_early", None
    return "error", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
