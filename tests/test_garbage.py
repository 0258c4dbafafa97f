"""A finished call leaves nothing for the garbage collector: every object the metering made for it is
freed by reference counting as soon as the call is over.

A reference cycle per call (a turn holding its call, the call its turn) is freed only by the cyclic
collector, which then runs dozens of times more often than for the bare SDK and, in its full
collections, walks every object of the process: a cost per call that grows with the application.
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import openai
import pytest

import moa_stream
from moa_stream import Preset
from moa_stream.testing import SimModel, Simulator, sim_client

from .conftest import EventLog

USER = [{"role": "user", "content": "Tell me about streams"}]
PRESETS = {"trio": Preset(references=["sim-small", "sim-large"], aggregator="sim-small", cadence="per_call")}


async def chat(client: openai.AsyncOpenAI, model: str, *, stream: bool) -> None:
    if not stream:
        await client.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
        return
    async with await client.chat.completions.create(model=model, messages=USER, stream=True) as chunks:  # type: ignore[arg-type]
        async for _ in chunks:
            pass


async def responses(client: openai.AsyncOpenAI, model: str, *, stream: bool) -> None:
    if not stream:
        await client.responses.create(model=model, input="Tell me about streams")
        return
    async with await client.responses.create(model=model, input="Tell me about streams", stream=True) as events:
        async for _ in events:
            pass


async def broken_off(client: openai.AsyncOpenAI, model: str, *, stream: bool) -> None:
    async with await client.chat.completions.create(model=model, messages=USER, stream=True) as chunks:  # type: ignore[arg-type]
        async for _ in chunks:
            break


CASES: dict[str, tuple[Callable[..., Awaitable[None]], str, bool]] = {
    "chat whole": (chat, "sim-small", False),
    "chat stream": (chat, "sim-small", True),
    "chat stream broken off": (broken_off, "sim-small", True),
    "responses whole": (responses, "sim-small", False),
    "responses stream": (responses, "sim-small", True),
    "moa whole": (chat, "moa:trio", False),
    "moa stream": (chat, "moa:trio", True),
    "moa responses stream": (responses, "moa:trio", True),
}


@pytest.fixture
def collector_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def cyclic_garbage_of_ours() -> list[str]:
    """The objects of moa_stream's own types that only the cyclic collector would free."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found = [type(item).__qualname__ for item in gc.garbage if type(item).__module__.startswith("moa_stream")]
    gc.garbage.clear()
    gc.set_debug(0)
    return found


async def bare_leaves_cycles() -> bool:
    """Whether the bare SDK's own responses are freed only by the cyclic collector (httpx 0.x keeps
    each response in a cycle with its bound stream; httpx2 does not): then whatever a response holds,
    our byte stream and its call included, waits for the collector with it, whatever we do."""
    client = sim_client(Simulator([SimModel(name="sim-small")]))
    await chat(client, "sim-small", stream=False)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    await chat(client, "sim-small", stream=False)
    gc.collect()
    left = bool(gc.garbage)
    gc.garbage.clear()
    gc.set_debug(0)
    await client.close()
    del client
    gc.collect()  # the closed client's own cycles, gone before the test counts
    return left


@pytest.mark.parametrize("fast", [False, True], ids=["wrapped", "fast"])
@pytest.mark.parametrize("case", list(CASES))
async def test_a_finished_call_leaves_no_reference_cycle(
    case: str, fast: bool, tmp_path: Path, collector_paused: None
) -> None:
    if await bare_leaves_cycles():
        pytest.skip("the SDK's HTTP library keeps every response in a reference cycle of its own")
    call, model, stream = CASES[case]
    sim = Simulator([SimModel(name="sim-small"), SimModel(name="sim-large")])
    log = EventLog()
    client = moa_stream.wrap(sim_client(sim), sinks=[log], trace_dir=tmp_path, presets=PRESETS, fast=fast)
    for _ in range(2):  # first sight of the upstream: what it sends unasked is learned
        await call(client, model, stream=stream)
    assert await moa_stream.flush(client)
    cyclic_garbage_of_ours()  # what set-up left

    for _ in range(5):
        await call(client, model, stream=stream)
    assert await moa_stream.flush(client)
    assert cyclic_garbage_of_ours() == []
    assert len(log.of(moa_stream.TurnTrace)) == 7
    await client.close()
