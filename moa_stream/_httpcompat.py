"""Which HTTP library a client speaks: openai 2.x uses `httpx`, openai 3.x uses `httpx2`.

Both expose the same API under different module names, and their client only accepts responses
and byte streams of its own module, so everything we hand back is built from the client's module.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any


def default_module() -> ModuleType:
    """The HTTP module that the installed openai SDK builds its clients with."""
    import openai._base_client as base

    for name in ("httpx2", "httpx"):
        module = getattr(base, name, None)
        if isinstance(module, ModuleType):
            return module
    raise RuntimeError("cannot tell which HTTP library the installed openai SDK uses")


def module_of(http_client: object) -> ModuleType:
    """The `httpx`-like module that `http_client` (an AsyncClient instance) comes from."""
    for cls in type(http_client).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in ("httpx", "httpx2"):
            return importlib.import_module(root)
    raise TypeError(f"expected an httpx or httpx2 AsyncClient, got {type(http_client).__qualname__}")


@functools.cache
def byte_stream_base(module: ModuleType) -> type[Any]:
    """`module.AsyncByteStream`: the client asserts that response streams derive from it."""
    base: type[Any] = module.AsyncByteStream
    return base
