"""How calls and turns ended, in the words events use: the worst status of a turn's calls, a reason on
one line, where a call's recorded output came from, and a turn's summary (`TurnEnd`)."""

from __future__ import annotations

import anyio

from ._events import CallRecord, CallStatus, CallUsage, OutputSource, TurnEnd

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


def turn_end(
    records: list[CallRecord],
    *,
    turn_id: str,
    session_id: str,
    model: str,
    main: CallUsage | None,
    started_at: float,
    duration_s: float,
    status: CallStatus,
    error: str | None,
) -> TurnEnd:
    """A turn's summary from its calls' records; `main` is the usage of the call whose output the
    caller received (the acting model: its tool calls are the turn's)."""
    usages = [record.usage for record in records]
    acting = next((record for record in records if main is not None and record.call_id == main.call_id), None)
    tool_names = [call.name or "" for call in acting.output.tool_calls] if acting is not None else []
    return TurnEnd(
        turn_id=turn_id,
        session_id=session_id,
        model=model,
        calls=len(usages),
        failed_calls=sum(u.status == "error" for u in usages),
        input_tokens=sum(u.input_tokens or 0 for u in usages),
        cached_input_tokens=sum(u.cached_input_tokens or 0 for u in usages),
        cache_write_tokens=sum(u.cache_write_tokens or 0 for u in usages),
        output_tokens=sum(u.output_tokens or 0 for u in usages),
        reasoning_tokens=sum(u.reasoning_tokens or 0 for u in usages),
        usage_complete=all(u.usage_source != "missing" for u in usages),
        cost_usd=sum(u.cost_usd or 0.0 for u in usages),
        cost_complete=all(u.cost_usd is not None for u in usages),
        tool_calls=len(tool_names),
        tool_names=tool_names,
        started_at=started_at,
        ttft_s=None if main is None or main.ttft_s is None else main.ttft_s + (main.started_at - started_at),
        duration_s=duration_s,
        status=status,
        error=error,
    )
