"""The trace writer: one JSON line per turn in `<trace_dir>/<session_id>.jsonl`.

Several processes may share a trace directory (replicas of `moa-stream serve`, workers) and write
the same session's file: each batch is appended whole under an exclusive `flock` of that file, so
their lines never interleave, and readers keep one file per session.
"""

from __future__ import annotations

import errno
import fcntl
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

    Lines are only ever appended whole, in one unbuffered write per batch and file under the file's
    lock (which every writer, in any process, takes), so a crash can tear at most the last line of a
    file, and the next writer deals with that line before it appends. The most recently used files
    stay open (a file that was moved or deleted meanwhile, as by log rotation, is opened anew). It
    runs on the dispatcher's own thread, so it writes there directly: a thread hop per write would
    cost more than the write.
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
                _append_locked(fd, buffer)
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
        # Read as well: a writer looks at the file's tail for a line torn by a writer that died.
        fd = self._files[path] = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return fd

    async def aclose(self) -> None:
        """Close the open trace files (the dispatcher calls it when it stops)."""
        while self._files:
            _, fd = self._files.popitem()
            os.close(fd)


_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})


def _append_locked(fd: int, data: bytearray) -> None:
    """Append `data` whole while holding the file's exclusive lock: one lock per batch, not per line.

    The lock keeps another process's write from landing between the pieces of a short write, and its
    rollback from cutting lines that are not its own."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise
        # A file system without locks (an NFS mount without lockd) still takes one process's traces.
        _append(fd, data, os.fstat(fd).st_size)
        return
    try:
        _append(fd, data, _whole_lines_end(fd))
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _append(fd: int, data: bytearray, start: int) -> None:
    """Write all of `data` at the end of the file, `start` bytes long, or none of it: a failed write
    (a full disk) takes its partial line back, so that a torn line can only ever be the last one."""
    view = memoryview(data)
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, view[written:])
    except OSError:
        # Only back to the length seen before this write, and only if nothing else grew the file
        # meanwhile (a writer that ignores the lock): then the bytes past `start` are all ours.
        if written and os.fstat(fd).st_size == start + written:
            os.ftruncate(fd, start)
        raise
    finally:
        view.release()


_SCAN = 64 * 1024


def _whole_lines_end(fd: int) -> int:
    """The file's length once a torn last line is dealt with: it was left by a writer that died
    mid-write (no live one is mid-line while we hold the lock), and a line appended after it would
    be glued to it, making both unreadable. A tail that is a whole record but for its newline is
    ended, as `read_traces` reads it; anything else is cut off."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    start = size
    while start > 0:
        begin = max(0, start - _SCAN)
        newline = os.pread(fd, start - begin, begin).rfind(b"\n")
        if newline >= 0:
            start = begin + newline + 1
            break
        start = begin
    if _decodes(os.pread(fd, size - start, start)):
        os.write(fd, b"\n")
        return size + 1
    os.ftruncate(fd, start)
    return start


def _decodes(line: bytes) -> bool:
    try:
        event_decoder.decode(line)
    except msgspec.DecodeError:
        return False
    return True


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
