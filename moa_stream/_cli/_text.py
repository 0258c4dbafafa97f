"""Plain-text formatting shared by the `traces` commands."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import TextIO

import msgspec

from .._events import TurnTrace, event_decoder
from .._traces import read_traces

PROG = "moa-stream traces"


class BadInput(Exception):
    """A message for stderr; the command exits 1."""


# -- formatting ---------------------------------------------------------------------------------


def usd(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "unknown"
    return f"${value:.6f}"


def secs(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.3f}s"


def tokens(value: int | None, mark: str) -> str:
    return "?" if value is None else f"{mark}{value:,}"


def when(timestamp: float) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def load(path: Path, err: TextIO) -> list[TurnTrace]:
    """Every record of `path`; a torn last line is mentioned on `err`, anything worse raises."""
    try:
        records = list(read_traces(path))
        data = path.read_bytes()
    except ValueError as exc:  # read_traces names the file and line
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    # read_traces skips a last line that does not decode (a crash mid-write); say so.
    tail = data.rsplit(b"\n", 1)[-1]
    if tail.strip():
        try:
            event_decoder.decode(tail)
        except msgspec.DecodeError:
            line = data.count(b"\n") + 1
            print(
                f"{PROG}: {path}:{line}: incomplete last line skipped (a crash or a write in progress)",
                file=err,
            )
    return records


_CONTROL = {code: "\N{REPLACEMENT CHARACTER}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code not in (9, 10)}


def printable(text: str) -> str:
    return text.translate(_CONTROL).expandtabs(4)


def cut(text: str, width: int) -> str:
    text = printable(text).replace("\n", " ")
    return text if len(text) <= width else text[: max(0, width - 1)] + "\N{HORIZONTAL ELLIPSIS}"
