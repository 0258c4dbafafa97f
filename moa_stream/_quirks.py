"""What upstreams do that the wire format does not say, learned as calls go.

Two things decide how a streamed call is sent and what the caller gets back of it:
- whether an upstream refuses `stream_options` (some OpenAI-compatible servers answer 400);
- what an upstream sends when usage was *not* asked for: a usage chunk anyway (vLLM with
  `--enable-force-include-usage`), a `"usage": null` key on every chunk, or neither (OpenAI).

The wrapper asks for usage on the caller's behalf and then hides what the caller would not have seen
from the bare SDK; it can only hide the right things once it knows what the upstream sends unasked.
That is learned from the first call per upstream and model, sent as the caller wrote it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

_MAX_LEARNED = 4096


class UnaskedUsage(NamedTuple):
    """What an upstream streams about usage when the request did not ask for it."""

    chunk: bool
    """A usage chunk (`choices: []`) comes anyway."""
    key: bool
    """Every chunk carries a `usage` key (null until the last)."""


NOTHING_UNASKED = UnaskedUsage(chunk=False, key=False)


def _documented(origin: str) -> bool:
    # OpenAI's own API and Azure OpenAI send neither unless asked (documented for `include_usage`).
    host = urlsplit(origin).hostname or ""
    return host == "api.openai.com" or host.endswith(".openai.azure.com")


class UpstreamQuirks:
    """Learned behaviour per upstream origin (`scheme://host:port`) and model; thread-safe, bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rejects_stream_options: set[str] = set()
        self._lacks_responses: set[str] = set()
        self._unasked: OrderedDict[tuple[str, str], UnaskedUsage] = OrderedDict()
        self.on_learn: Callable[[str, str], None] | None = None
        """Told each thing learned, as `(field, value)` (see `fields`), to share it."""

    def rejects_stream_options(self, origin: str) -> bool:
        return origin in self._rejects_stream_options

    def learn_rejects_stream_options(self, origin: str) -> None:
        with self._lock:
            self._rejects_stream_options.add(origin)
        self._tell(f"stream_options{_SEP}{origin}", "1")

    def lacks_responses(self, origin: str) -> bool:
        """The upstream answered `/responses` with 404 or 405: it has no Responses API."""
        return origin in self._lacks_responses

    def learn_lacks_responses(self, origin: str) -> None:
        with self._lock:
            self._lacks_responses.add(origin)
        self._tell(f"no_responses{_SEP}{origin}", "1")

    def unasked_usage(self, origin: str, model: str) -> UnaskedUsage | None:
        """What `model` at `origin` streams about usage unasked; None until a call has shown it."""
        found = self._unasked.get((origin, model))
        if found is None and _documented(origin):
            return NOTHING_UNASKED
        return found

    def learn_unasked_usage(self, origin: str, model: str, *, chunk: bool, key: bool, tell: bool = True) -> None:
        with self._lock:
            self._unasked[(origin, model)] = UnaskedUsage(chunk=chunk, key=key)
            self._unasked.move_to_end((origin, model))
            while len(self._unasked) > _MAX_LEARNED:
                self._unasked.popitem(last=False)
        if tell:
            self._tell(f"unasked{_SEP}{origin}{_SEP}{model}", f"{int(chunk)}{int(key)}")

    def _tell(self, field: str, value: str) -> None:
        if self.on_learn is not None:
            self.on_learn(field, value)

    def absorb(self, learned: Mapping[str, str]) -> None:
        """Take what other processes learned (fields as `on_learn` is told them)."""
        for field, value in learned.items():
            kind, _, rest = field.partition(_SEP)
            if kind == "stream_options":
                with self._lock:
                    self._rejects_stream_options.add(rest)
            elif kind == "no_responses":
                with self._lock:
                    self._lacks_responses.add(rest)
            elif kind == "unasked" and _SEP in rest and len(value) == 2:
                origin, _, model = rest.partition(_SEP)
                self.learn_unasked_usage(origin, model, chunk=value[0] == "1", key=value[1] == "1", tell=False)


_SEP = "\x1f"
