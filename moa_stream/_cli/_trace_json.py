"""The JSON documents of `moa-stream traces ... --json`: one document per invocation, keys kept stable.

Every document has `command` (`list`, `show` or `stats`), `source` (the path given), `files` (trace
files read), `skipped_files` (a directory's unreadable files: `file`, `error`; the command then exits
1) and `filters` (`since`: ISO 8601 UTC or null, `sessions`: a list or null). Then:

- `list`: `order` (`"started_at"`: oldest first) and `turns`, a list of turn objects (below).
- `show`: `turn`, one turn object, and `trace`, the `TurnTrace` record as the file holds it.
- `stats`: `total`, `by_model`, `by_session`, `by_requested_model`, `by_role` and `prices` (see
  `_trace_stats` and `_trace_prices`).

A turn object: `turn_id`, `file`, `session_id`, `started_at` (Unix time), `started` (ISO 8601 UTC),
`model` (what the caller asked for: a model or `moa:<preset>`), `preset` (or null), `status` (as
recorded: `completed`, `closed_early`, `cancelled`, `error`), `refused` (true for a turn refused
before any call: no call and status `error`), `error` (why a turn with status `error` failed, else
null), `calls`, `failed_calls`, `input_tokens`, `cached_input_tokens`, `cache_write_tokens`,
`output_tokens`, `reasoning_tokens`, `usage_complete` (false: the token counts are lower bounds),
`cost_usd`, `cost_complete` (false: `cost_usd` is a lower bound), `ttft_s` (or null),
`duration_s`, `tool_calls` (tool calls the acting model requested) and `tool_names`.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from ._trace_select import (
    Gathered,
    Turn,
    finite,
    iso,
    reason,
    refused,
    turn_cache_write_tokens,
    turn_tool_calls,
    turn_tool_names,
)


def envelope(command: str, gathered: Gathered, since: float | None, sessions: list[str] | None) -> dict[str, Any]:
    """The keys every document starts with."""
    return {
        "command": command,
        "source": str(gathered.source),
        "files": gathered.files,
        "skipped_files": [{"file": str(path), "error": error} for path, error in gathered.skipped],
        "filters": {"since": None if since is None else iso(since), "sessions": sessions or None},
    }


def turn_json(turn: Turn) -> dict[str, Any]:
    record, end = turn.record, turn.record.end
    return {
        "turn_id": record.turn_id,
        "file": str(turn.path),
        "session_id": record.session_id,
        "started_at": finite(end.started_at),
        "started": iso(end.started_at),
        "model": record.model,
        "preset": record.preset,
        "status": end.status,
        "refused": refused(record),
        "error": reason(record),
        "calls": end.calls,
        "failed_calls": end.failed_calls,
        "input_tokens": end.input_tokens,
        "cached_input_tokens": end.cached_input_tokens,
        "cache_write_tokens": turn_cache_write_tokens(record),
        "output_tokens": end.output_tokens,
        "reasoning_tokens": end.reasoning_tokens,
        "usage_complete": end.usage_complete,
        "cost_usd": finite(end.cost_usd),
        "cost_complete": end.cost_complete,
        "ttft_s": finite(end.ttft_s),
        "duration_s": finite(end.duration_s),
        "tool_calls": turn_tool_calls(record),
        "tool_names": turn_tool_names(record),
    }


def write_json(document: dict[str, Any], out: TextIO) -> None:
    # allow_nan=False: NaN is not JSON; the builders above turn non-finite numbers into null.
    out.write(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
