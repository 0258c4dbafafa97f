"""Redaction of message content in persisted copies (trace records), never upstream or to the caller."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from ._events import CallOutput, CallRecord, ToolCall, TurnTrace

Redactor = Callable[[str], str]
"""Maps a piece of message text to what may be stored."""

RedactInput = Redactor | Sequence[str | re.Pattern[str]]

REDACTED = "[REDACTED]"


def make_redactor(redact: RedactInput) -> Redactor:
    """A callable as it is; a list of regular expressions becomes one that replaces their matches."""
    if callable(redact):
        return redact
    patterns = []
    for pattern in redact:
        try:
            patterns.append(pattern if isinstance(pattern, re.Pattern) else re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"redact: pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    if not patterns:
        raise ValueError("redact: give a callable or at least one pattern")
    combined = re.compile("|".join(f"(?:{p.pattern})" for p in patterns))
    return lambda text: combined.sub(REDACTED, text)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def secret_redactor(secrets: Iterable[str]) -> Redactor:
    """A redactor that replaces the given credential values (longest first, so none is half-replaced)."""
    ordered = sorted(set(secrets), key=len, reverse=True)
    return lambda text: scrub(text, ordered)


def redact_trace(trace: TurnTrace, redactor: Redactor) -> TurnTrace:
    """A copy of `trace` whose message texts, outputs and tool arguments went through `redactor`."""
    return msgspec.structs.replace(trace, calls=[_record(call, redactor) for call in trace.calls])


def _record(record: CallRecord, redactor: Redactor) -> CallRecord:
    output = record.output
    return msgspec.structs.replace(
        record,
        instructions=None if record.instructions is None else redactor(record.instructions),
        input_messages=[_message(m, redactor) for m in record.input_messages],
        output=CallOutput(
            text=redactor(output.text),
            reasoning=redactor(output.reasoning),
            refusal=redactor(output.refusal),
            tool_calls=[
                ToolCall(index=t.index, id=t.id, name=t.name, arguments=redactor(t.arguments))
                for t in output.tool_calls
            ],
        ),
    )


def _message(message: Any, redactor: Redactor) -> Any:
    if not isinstance(message, dict):
        return message
    copy = dict(message)
    content = copy.get("content")
    if isinstance(content, str):
        copy["content"] = redactor(content)
    elif isinstance(content, list):
        copy["content"] = [_part(part, redactor) for part in content]
    calls = copy.get("tool_calls")
    if isinstance(calls, list):
        copy["tool_calls"] = [_tool_call(call, redactor) for call in calls]
    # Responses API items: a function call's arguments, a tool result's output, a reasoning
    # item's summary.
    for key in ("arguments", "output"):
        if isinstance(copy.get(key), str):
            copy[key] = redactor(copy[key])
    summary = copy.get("summary")
    if isinstance(summary, list):
        copy["summary"] = [_part(part, redactor) for part in summary]
    return copy


def _part(part: Any, redactor: Redactor) -> Any:
    if not isinstance(part, dict):
        return part
    copy = dict(part)
    for key in ("text", "refusal"):  # text, input_text, output_text parts; refusal parts
        if isinstance(copy.get(key), str):
            copy[key] = redactor(copy[key])
    return copy


def _tool_call(call: Any, redactor: Redactor) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        return {**call, "function": {**function, "arguments": redactor(function["arguments"])}}
    return call


def url_without_credentials(url: str) -> str:
    """`url` without a user or password in its user-info part: what output, logs and errors may show."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    # Everything after the last "@" is the host and port, as written.
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
