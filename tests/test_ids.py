"""Turn and call ids: uuid4-shaped hex, unique, and not repeated by a forked child."""

from __future__ import annotations

import re
import subprocess
import sys

from moa_stream._ids import new_id

FORKED = """
import os
from moa_stream._ids import new_id
new_id()  # the generator has been used before the fork
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, new_id().encode())
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(read, 64).decode(), new_id())
"""


def test_ids_are_32_lowercase_hex_digits_and_unique() -> None:
    ids = [new_id() for _ in range(100_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids[:1000])
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    result = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=30, check=True)
    child, parent = result.stdout.split()
    assert child != parent
