"""The trace writer: one JSON line per turn in `<trace_dir>/<session_id>.jsonl`."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiofiles
import anyio
import msgspec

from ._events import Event, TurnTrace, event_decoder, event_encoder
from ._session import sanitize_session_id


def _private_file(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


_OPEN_FILES = 16


class TraceWriter:
    """An async sink that appends each `TurnTrace` as one line; the dispatcher hands it batches.

    Lines are only ever appended whole, in one unbuffered write per batch and file, so a crash can
    tear at most the last line of a file. The most recently used files stay open (a file that was
    moved or deleted meanwhile, as by log rotation, is opened anew).
    """

    event_types = (TurnTrace,)

    def __init__(self, trace_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(trace_dir)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"trace_dir {str(trace_dir)!r} cannot be created: {exc.strerror}") from exc
        if not self.directory.is_dir():
            raise ValueError(f"trace_dir {str(trace_dir)!r} is not a directory")
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"trace_dir {str(trace_dir)!r} is not writable")
        self.written = 0
        self._files: OrderedDict[Path, Any] = OrderedDict()

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
            path = self.path_for(session_id)
            file = await self._file(path)
            try:
                await _append(file, b"".join(session_lines))
            except OSError:
                # The disk may come back (space freed, directory restored): open the file anew next time.
                del self._files[path]
                await file.close()
                raise
            self.written += len(session_lines)

    async def _file(self, path: Path) -> Any:
        file = self._files.get(path)
        if file is not None and _same_file(path, file.fileno()):
            self._files.move_to_end(path)
            return file
        if file is not None:
            del self._files[path]
            await file.close()
        while len(self._files) >= _OPEN_FILES:
            _, oldest = self._files.popitem(last=False)
            await oldest.close()
        file = self._files[path] = await aiofiles.open(path, "ab", buffering=0, opener=_private_file)
        return file

    async def aclose(self) -> None:
        """Close the open trace files (the dispatcher calls it when it stops)."""
        while self._files:
            _, file = self._files.popitem()
            await file.close()


async def _append(file: Any, data: bytes) -> None:
    """Write all of `data`, or none of it: a failed write (a full disk) takes its partial line back,
    so that a torn line can only ever be the last one of a file."""
    view = memoryview(data)
    written = 0
    try:
        while written < len(data):
            written += await file.write(view[written:])
    except OSError:
        if written:
            await anyio.to_thread.run_sync(_drop_tail, file.fileno(), written)
        raise


def _drop_tail(fd: int, count: int) -> None:
    # The file is opened for appending, so the bytes of the failed write are its last ones.
    os.ftruncate(fd, os.fstat(fd).st_size - count)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


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
