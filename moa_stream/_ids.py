"""Ids of turns, calls and served responses: 128 random bits as 32 hex digits, like `uuid4().hex`.

`uuid4()` reads the operating system's random source on every call, a system call that costs tens of
microseconds on some machines, twice per call here. These ids need to be unique, not secret, so they
come from a generator seeded once from that source, and seeded again in a forked child (which would
otherwise repeat its parent's ids).
"""

from __future__ import annotations

import os
import random

_random = random.Random(os.urandom(32))


def _reseed() -> None:
    _random.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """A new id: 32 lowercase hex digits."""
    return f"{_random.getrandbits(128):032x}"
