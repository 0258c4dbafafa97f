"""The trace writer: one JSON line per turn in `<trace_dir>/<session_id>.jsonl`."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import msgspec

from ._events import Event, TurnTrace, event_decoder, event_encoder
from ._session import sanitize_session_id

_OPEN_FILES = 16


class TraceWriter:
    """A sink that appends each `TurnTrace` as one line; the dispatcher hands it batches.

    Lines are only ever appended whole, in one unbuffered write per batch and file, so a crash can
    tear at most the last line of a file. The most recently used files stay open (a file that was
    moved or deleted meanwhile, as by log rotation, is opened anew). It runs on the dispatcher's own
    thread, so it writes there directly: a thread hop per write would cost more than the write.
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
        self._files: OrderedDict[Path, int] = OrderedDict()
        self._buffer = bytearray()  # reused: msgspec encodes each batch's lines into it

    def path_for(self, session_id: str) -> Path:
        return self.directory / f"{sanitize_session_id(session_id)}.jsonl"

    async def __call__(self, event: Event) -> None:
        await self.write_batch([event])

    async def write_batch(self, events: list[Event]) -> None:
        """Append the trace records among `events`: one write per session file."""
        by_session: dict[str, list[TurnTrace]] = {}
        for event in events:
            if isinstance(event, TurnTrace):
                by_session.setdefault(event.session_id, []).append(event)
        buffer = self._buffer
        for session_id, traces in by_session.items():
            buffer.clear()
            for trace in traces:
                event_encoder.encode_into(trace, buffer, len(buffer))
                buffer.append(0x0A)
            path = self.path_for(session_id)
            fd = self._file(path)
            try:
                _append(fd, buffer)
            except OSError:
                # The disk may come back (space freed, directory restored): open the file anew next time.
                del self._files[path]
                os.close(fd)
                raise
            self.written += len(traces)

    def _file(self, path: Path) -> int:
        fd = self._files.get(path)
        if fd is not None and _same_file(path, fd):
            self._files.move_to_end(path)
            return fd
        if fd is not None:
            del self._files[path]
            os.close(fd)
        while len(self._files) >= _OPEN_FILES:
            _, oldest = self._files.popitem(last=False)
            os.close(oldest)
        fd = self._files[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return fd

    async def aclose(self) -> None:
        """Close the open trace files (the dispatcher calls it when it stops)."""
        while self._files:
            _, fd = self._files.popitem()
            os.close(fd)


def _append(fd: int, data: bytearray) -> None:
    """Write all of `data`, or none of it: a failed write (a full disk) takes its partial line back,
    so that a torn line can only ever be the last one of a file."""
    view = memoryview(data)
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, view[written:])
    except OSError:
        if written:
            # The file is opened for appending, so the bytes of the failed write are its last ones.
            os.ftruncate(fd, os.fstat(fd).st_size - written)
        raise
    finally:
        view.release()


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
