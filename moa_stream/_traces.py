"""The trace writer: one JSON line per turn in `<trace_dir>/<session_id>.jsonl`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import aiofiles
import msgspec

from ._events import Event, TurnTrace, event_decoder, event_encoder
from ._session import sanitize_session_id


def _private_file(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


class TraceWriter:
    """An async sink that appends each `TurnTrace` as one line; the dispatcher hands it batches.

    Lines are only ever appended whole, in one write per batch, so a crash can tear at most the
    last line of a file.
    """

    def __init__(self, trace_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(trace_dir)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"trace_dir {str(trace_dir)!r} cannot be created: {exc.strerror}") from exc
        if not self.directory.is_dir():
            raise ValueError(f"trace_dir {str(trace_dir)!r} is not a directory")
        self.written = 0

    def path_for(self, session_id: str) -> Path:
        return self.directory / f"{sanitize_session_id(session_id)}.jsonl"

    async def __call__(self, event: Event) -> None:
        await self.write_batch([event])

    async def write_batch(self, events: list[Event]) -> None:
        """Append the trace records among `events`: one open and one write per session file."""
        lines: dict[str, list[bytes]] = {}
        for event in events:
            if isinstance(event, TurnTrace):
                lines.setdefault(event.session_id, []).append(event_encoder.encode(event) + b"\n")
        for session_id, session_lines in lines.items():
            async with aiofiles.open(self.path_for(session_id), "ab", opener=_private_file) as file:
                await file.write(b"".join(session_lines))
            self.written += len(session_lines)


def read_traces(path: str | os.PathLike[str]) -> Iterator[TurnTrace]:
    """The trace records of one file, in order; a torn final line (a crash mid-write) is skipped."""
    with open(path, "rb") as file:
        lines = file.read().split(b"\n")
    last = len(lines) - 1
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = event_decoder.decode(line)
        except msgspec.DecodeError as exc:
            if number == last:
                return  # only the line being written when the writer died can be incomplete
            raise ValueError(f"{os.fspath(path)}:{number + 1}: not a trace record ({exc})") from exc
        if isinstance(record, TurnTrace):
            yield record
