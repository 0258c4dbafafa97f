"""Session ids: which session a call belongs to, and a file-name-safe form of it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar

SESSION_HEADER = "x-moa-session"
"""Request header that names the session; removed before the request goes upstream."""

KEY_HEADER = "x-moa-key"
"""Request header that names the API key (of `serve --keys`) a request came with: its key-level
budget applies; removed before the request goes upstream."""

_MAX_LEN = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

_current: ContextVar[str | None] = ContextVar("moa_stream_session", default=None)
_process_default = f"process-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


@contextlib.contextmanager
def session(session_id: str) -> Iterator[str]:
    """Attribute the calls made inside the block (and tasks started in it) to `session_id`.

    Yields the sanitized id, which is the one events carry and trace files are named after.
    """
    safe = sanitize_session_id(session_id)
    token = _current.set(safe)
    try:
        yield safe
    finally:
        _current.reset(token)


def current_session(header_value: str | None = None) -> str:
    """The session for a request: its header, else the enclosing `session()`, else the process's."""
    if header_value:
        return sanitize_session_id(header_value)
    return _current.get() or _process_default


def sanitize_session_id(session_id: str) -> str:
    """Make a session id safe as a file name: no separators, no traversal, bounded length.

    Ids that had to change get a short hash of the original, so distinct ids stay distinct.
    """
    if not isinstance(session_id, str):
        raise TypeError(f"session id must be a str, got {type(session_id).__name__}")
    safe = _UNSAFE.sub("_", session_id).lstrip(".")
    if safe == session_id and 0 < len(safe) <= _MAX_LEN:
        return safe
    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe[: _MAX_LEN - 13] or 'session'}-{digest}"
