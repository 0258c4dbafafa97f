"""Server-sent events framing: a byte stream cut into whole events, their raw bytes kept.

The one framer of the package: the tee reads each event's `data` while passing the bytes on as they
came, and fast mode builds the SDK's events from the same blocks. CR, LF and CRLF all end a line and
an empty line ends an event, as the SSE specification and the openai SDK's decoder have it (a CR at
the end of one read and an LF at the start of the next are one CRLF); `event:` lines (the Responses
API's) are read as well as `data:` ones.
"""

from __future__ import annotations

import re

# A line end followed by a line end: an empty line, so the end of an event. A CR directly followed
# by LF is one line end (CRLF), never two; a CR at the very end of the bytes so far is a line end
# already (whatever comes next: an LF then is the rest of a CRLF, see `skipped_lf`).
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r(?!\n)|\n")


class SSEFramer:
    """Cuts the reads of a byte stream into blocks that each end with a complete line: whole events
    (their lines and the empty line that ends them), or empty lines between events. What is left
    unfinished waits for the next read."""

    __slots__ = ("_after_cr", "_pending", "skipped_lf")

    def __init__(self) -> None:
        self._pending = b""
        self._after_cr = False
        self.skipped_lf = False
        """After `feed`: its first block is the LF of a CRLF whose CR ended the read before (its
        bytes, but no line)."""

    def feed(self, data: bytes) -> tuple[bytes, list[bytes]]:
        """The blocks that `data` completes, as (all their bytes, each block's bytes)."""
        self.skipped_lf = False
        if self._after_cr and data.startswith(b"\n"):
            self.skipped_lf = True
            self._after_cr = False
            rest = self.feed(data[1:])
            self.skipped_lf = True
            return b"\n" + rest[0], [b"\n", *rest[1]]
        if self._pending:
            data = self._pending + data
            self._pending = b""
        # The hot path: servers flush one single-line `data:` event per write.
        elif data.endswith(b"\n\n") and data.find(b"\n") == len(data) - 2 and b"\r" not in data:
            self._after_cr = False
            return data, [data]
        blocks: list[bytes] = []
        start = 0
        if b"\r" in data:
            for match in _EVENT_END.finditer(data):
                blocks.append(data[start : match.end()])
                start = match.end()
        else:
            while (found := data.find(b"\n\n", start)) >= 0:
                blocks.append(data[start : found + 2])
                start = found + 2
        # An empty line after the last event: complete on its own, not the start of the next event.
        empty = _LINE_END.match(data, start)
        if empty is not None and empty.start() == start:
            blocks.append(data[start : empty.end()])
            start = empty.end()
        self._pending = data[start:]
        # A CR that ended the last block (not one inside the unfinished rest, which the next read
        # joins with what follows).
        self._after_cr = not self._pending and data.endswith(b"\r")
        return (data[:start] if self._pending else data), blocks

    @property
    def idle(self) -> bool:
        """Nothing is held from earlier reads: a read of whole events is complete on its own."""
        return not self._pending and not self._after_cr

    @property
    def pending(self) -> bytes:
        """Bytes of an event not finished yet (at the end of a stream: an event without its empty line)."""
        return self._pending


def data_of(block: bytes) -> bytes | None:
    """The `data` of one event (its `data:` lines joined by LF), or None for an event without data
    (comments, keep-alives, empty lines)."""
    if block.startswith(b"data: ") and block.find(b"\n") == len(block) - 2 and block.endswith(b"\n\n"):
        return block[6:-2]
    return fields(block)[1]


def fields(block: bytes) -> tuple[bytes | None, bytes | None]:
    """(event name, data) of one event; either is None when the event has no such line."""
    name: bytes | None = None
    parts: list[bytes] = []
    for line in block.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            value = line[6:]
            name = value[1:] if value.startswith(b" ") else value
    return name, (b"\n".join(parts) if parts else None)
