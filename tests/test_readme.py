"""The README's examples are specifications: every ```python block runs as written against the
simulator's HTTP server, every ```toml block is a valid `moa.toml`, every ```json block is an event.

A Python block runs as a reader would run it, in a fresh interpreter: `OPENAI_BASE_URL` points at
the simulator, `OPENAI_API_KEY` is set to anything, the working directory is empty (blocks may write
trace directories), and the network beyond loopback is off. Top-level `await` is allowed (as in
`python -m asyncio` or a notebook). A failure names the block's line in README.md, and its
traceback shows README.md's own lines.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec
import openai
import pytest

import moa_stream
from moa_stream.testing import default_simulator

from .conftest import ServerThread

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_NETWORK = "README block tried to reach the network:"
_TIMEOUT_S = 180
# The frameworks (the `frameworks` extra) need openai 3.x: on openai 2.x, where scripts/test runs
# the suite again without them, their blocks are skipped (as tests/test_adapter_* are).
_FRAMEWORKS = ("agents", "pydantic_ai", "langchain_openai", "litellm", "moa_stream.adapters")
_OPENAI_3 = int(openai.__version__.split(".")[0]) >= 3

# Runs one block in the child interpreter: compiled with README.md's line numbers (so tracebacks
# quote README.md), in a fresh namespace, awaited when it has a top-level await.
_RUNNER = f"""
import ast, asyncio, inspect, ipaddress, socket, sys

readme, first_line, source = sys.argv[1], int(sys.argv[2]), sys.stdin.read()
connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

def loopback(host):
    host = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

def refuse(what):
    print({_NETWORK!r}, what, file=sys.stderr, flush=True)
    raise OSError("the network is off in README tests")

def guarded_connect(self, address):
    if isinstance(address, tuple) and not loopback(address[0]):
        refuse(f"connect {{address!r}}")
    return connect(self, address)

def guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not loopback(host):
        refuse(f"getaddrinfo {{host!r}}")
    return getaddrinfo(host, *args, **kwargs)

socket.socket.connect = guarded_connect
socket.getaddrinfo = guarded_getaddrinfo

tree = ast.parse(source, readme)
ast.increment_lineno(tree, first_line - 1)
code = compile(tree, readme, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {{"__name__": "__main__"}})
if inspect.iscoroutine(result):
    asyncio.run(result)
"""


class Block(NamedTuple):
    line: int
    """Line of README.md where the block's code starts."""
    code: str


def readme_blocks(language: str) -> list[Block]:
    text = README.read_text(encoding="utf-8")
    return [
        Block(line=text.count("\n", 0, match.start(2)) + 1, code=match.group(2))
        for match in _FENCE.finditer(text)
        if match.group(1) == language
    ]


def by_line(blocks: list[Block]) -> list[pytest.ParameterSet]:
    return [pytest.param(block, id=f"README.md:{block.line}") for block in blocks]


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    """`moa-stream sim`'s simulator (the one the quickstart starts), on a free loopback port."""
    with ServerThread(default_simulator()) as server:
        yield server.base_url


def imports(block: Block) -> set[str]:
    """The modules a block imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(block.code)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def run_block(block: Block, cwd: Path, simulator_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a ```python block as a reader would; its stderr. Fails naming the block's line."""
    frameworks = sorted(m for m in imports(block) if any(m == f or m.startswith(f"{f}.") for f in _FRAMEWORKS))
    if frameworks and not _OPENAI_3:
        pytest.skip(f"{', '.join(frameworks)}: the frameworks need openai 3.x")
    monkeypatch.setenv("OPENAI_BASE_URL", simulator_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else `import litellm` fetches prices
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(README), str(block.line)],
        input=block.code,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    where = f"README.md:{block.line}"
    if result.returncode != 0:
        pytest.fail(f"the block at {where} failed:\n{result.stderr}", pytrace=False)
    if _NETWORK in result.stderr:
        pytest.fail(f"the block at {where} tried to reach the network:\n{result.stderr}", pytrace=False)
    return result.stderr


@pytest.mark.parametrize("block", by_line(readme_blocks("python")))
def test_python_block_runs_against_the_simulator(
    block: Block, simulator_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_block(block, tmp_path, simulator_url, monkeypatch)


def test_quickstart_shows_the_turn_and_writes_its_trace(
    simulator_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = README.read_text(encoding="utf-8")
    heading = text.count("\n", 0, text.index("\n## Quickstart\n")) + 2
    quickstart = next(block for block in readme_blocks("python") if block.line > heading)
    assert "openai.AsyncOpenAI()" in quickstart.code  # the simulator is only the environment's choice
    stderr = run_block(quickstart, tmp_path, simulator_url, monkeypatch)
    assert "aggregating with" in stderr  # print_events: one line per event
    assert "[turn] moa:trio: completed, 4 calls" in stderr
    assert list((tmp_path / "traces").glob("*.jsonl"))


@pytest.mark.parametrize("block", by_line(readme_blocks("toml")))
def test_toml_block_is_a_valid_config(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "moa.toml"
    path.write_text(block.code, encoding="utf-8")
    try:
        moa_stream.load_config(path)
        moa_stream.load_budget(path)
    except moa_stream.ConfigError as exc:
        pytest.fail(f"the moa.toml at README.md:{block.line} is refused: {exc}")


@pytest.mark.parametrize("block", by_line(readme_blocks("json")))
def test_json_block_is_an_event(block: Block) -> None:
    event = moa_stream.event_decoder.decode(block.code)
    # What the encoder writes for it, but for layout: no field added, left out or renamed.
    assert msgspec.json.decode(block.code) == msgspec.json.decode(moa_stream.event_encoder.encode(event))
