"""The `moa-stream` command line: `demo`, `sim`, `serve`, `traces`, `bench` and `local`."""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
