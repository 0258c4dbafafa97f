"""A MoA turn's retry policy, for its aggregator request.

The caller's SDK never reruns a MoA turn (its answers say `x-should-retry: false`), so that no
reference runs twice for one request. The turn retries its aggregator itself, as the SDK would:
after a 408, 409, 429 or 5xx, or an exchange that dropped or timed out, before any byte reached the
caller, with the SDK's backoff. A refused connection (or a name that does not resolve) is not
retried: nothing listens there, and the caller hears so at once.
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

_RETRYABLE_STATUSES = frozenset({408, 409, 429})
_MAX_BACKOFF_S = 8.0
_MAX_RETRY_AFTER_S = 60.0


def retryable_status(response: Any) -> bool:
    """An error status worth a second try (unless the server says not to)."""
    if response.headers.get("x-should-retry") == "false":
        return False
    return response.status_code in _RETRYABLE_STATUSES or response.status_code >= 500


def retryable_failure(http: ModuleType, exc: BaseException) -> bool:
    """An exchange that failed without a response, and may go through on a second try."""
    return isinstance(exc, http.TransportError) and not isinstance(exc, http.ConnectError)


def backoff(attempt: int, headers: Any = None) -> float:
    """Seconds before the next attempt: the server's retry-after when it gives a sane one, else
    0.5 s doubling per attempt up to 8 s, less up to a quarter of jitter (the SDK's schedule)."""
    if headers is not None:
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                seconds = float(headers.get(name, "")) * scale
            except ValueError:
                continue
            if 0 <= seconds <= _MAX_RETRY_AFTER_S:
                return seconds
    return min(0.5 * 2.0**attempt, _MAX_BACKOFF_S) * (1 - 0.25 * random.random())
