"""LangChain's ChatOpenAI on a wrapped client: astream, ainvoke (with_raw_response), bound tools.

Everything runs on the embedded simulator; a guard fails the test if anything leaves loopback.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

import moa_stream
from moa_stream import Preset
from moa_stream.adapters.langchain import chat_openai
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .frameworks import get_weather as weather_function
from .frameworks import metered_turns, weather_calls

Wrapped = Callable[..., openai.AsyncOpenAI]
PRESETS = {
    "duo": Preset(references=["ref-a", "ref-b"], aggregator="agg"),
    # an aggregator still streaming when the caller stops reading, however the bytes are buffered
    "slow": Preset(references=["ref-a", "ref-b"], aggregator="agg-slow"),
}

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def sim() -> Simulator:
    names = ("ref-a", "ref-b", "agg", "plain")
    return Simulator([*(SimModel(name=name) for name in names), SimModel(name="agg-slow", tokens_per_s=100.0)])


def reported(message: BaseMessage) -> tuple[int, int]:
    assert isinstance(message, AIMessage)
    assert message.usage_metadata is not None
    return message.usage_metadata["input_tokens"], message.usage_metadata["output_tokens"]


get_weather = tool(weather_function)


async def streamed(chat: Any, messages: list[BaseMessage]) -> AIMessageChunk:
    message: AIMessageChunk | None = None
    async for chunk in chat.astream(messages):
        message = chunk if message is None else message + chunk
    assert message is not None
    return message


async def invoked(chat: Any, messages: list[BaseMessage]) -> BaseMessage:
    message: BaseMessage = await chat.ainvoke(messages)
    return message


@pytest.fixture(params=["astream", "ainvoke"])
def call(request: pytest.FixtureRequest) -> Callable[[Any, list[BaseMessage]], Awaitable[BaseMessage]]:
    """One model call through LangChain: `astream` (a per-chunk wait_for) or `ainvoke` (with_raw_response)."""
    return streamed if request.param == "astream" else invoked


async def test_chat_openai_is_built_on_the_wrapped_client(wrapped: Wrapped) -> None:
    client = wrapped(presets=PRESETS)
    chat = chat_openai(client, "moa:duo", temperature=0.2)
    assert isinstance(chat, ChatOpenAI)
    assert chat.root_async_client is client
    assert chat.stream_usage is True
    assert chat.stream_chunk_timeout  # so astream fetches every chunk in its own wait_for task
    assert chat.temperature == 0.2


async def test_moa_preset_reports_the_whole_turns_usage(
    wrapped: Wrapped, log: EventLog, sim: Simulator, call: Callable[[Any, list[BaseMessage]], Awaitable[BaseMessage]]
) -> None:
    chat = chat_openai(wrapped(presets=PRESETS), "moa:duo")
    message = await call(chat, [HumanMessage("Plan a weekend in Lisbon")])
    assert message.content
    [turn] = await metered_turns(log, sim, 1)
    assert turn.roles == ["aggregator", "reference", "reference"]
    assert reported(message) == (turn.input_tokens, turn.output_tokens)


async def test_plain_model_is_one_direct_call(
    wrapped: Wrapped, log: EventLog, sim: Simulator, call: Callable[[Any, list[BaseMessage]], Awaitable[BaseMessage]]
) -> None:
    chat = chat_openai(wrapped(presets=PRESETS), "plain")
    message = await call(chat, [HumanMessage("Plan a weekend in Lisbon")])
    [turn] = await metered_turns(log, sim, 1)
    assert turn.roles == ["direct"]
    assert reported(message) == (turn.input_tokens, turn.output_tokens)


async def test_bound_tool_is_called_by_the_aggregator_and_run_by_langchain(
    wrapped: Wrapped, log: EventLog, sim: Simulator, call: Callable[[Any, list[BaseMessage]], Awaitable[BaseMessage]]
) -> None:
    weather_calls.clear()
    chat = chat_openai(wrapped(presets=PRESETS), "moa:duo").bind_tools([get_weather])
    messages: list[BaseMessage] = [HumanMessage("What is the weather in Lisbon?")]
    first = await call(chat, messages)
    assert isinstance(first, AIMessage)
    [tool_call] = first.tool_calls
    messages += [first, await get_weather.ainvoke(tool_call)]
    second = await call(chat, messages)
    assert isinstance(second.content, str)
    assert second.content.startswith("Based on the tool result")
    assert weather_calls == [tool_call["args"]]
    metered = await metered_turns(log, sim, 2)
    # the second call of the same user turn reuses the references: only the aggregator runs
    assert [turn.roles for turn in metered] == [["aggregator", "reference", "reference"], ["aggregator"]]
    assert [reported(first), reported(second)] == [(t.input_tokens, t.output_tokens) for t in metered]
    assert "tools" in sim.requests_seen[-1]  # the aggregator was offered the tool


async def test_astream_closed_after_one_chunk_ends_the_turn_once(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]]
) -> None:
    chat = chat_openai(wrapped(presets=PRESETS), "moa:slow")
    async with contextlib.aclosing(chat.astream("Plan a weekend in Lisbon")) as stream:
        async for _ in stream:
            break
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    calls = {c.role: c.status for c in log.of(moa_stream.CallUsage)}
    assert (end.status, calls) == ("closed_early", {"reference": "completed", "aggregator": "closed_early"})
    await sim_idle()


async def test_astream_abandoned_after_one_chunk_is_finalized_by_the_garbage_collector(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]]
) -> None:
    chat = chat_openai(wrapped(presets=PRESETS), "moa:slow")
    stream = chat.astream("Plan a weekend in Lisbon")
    async for _ in stream:
        break
    del stream
    gc.collect()  # the loop's async-generator hook closes it, in a task of its own
    await log.wait_turns(1)
    assert [(e.status, e.calls) for e in log.of(moa_stream.TurnEnd)] == [("closed_early", 3)]
    assert len(log.of(moa_stream.CallUsage)) == 3
    await sim_idle()


async def test_sync_calls_fail_instead_of_bypassing_the_metering(wrapped: Wrapped, sim: Simulator) -> None:
    chat = chat_openai(wrapped(presets=PRESETS), "moa:duo")
    with pytest.raises(RuntimeError, match="async-only: use ainvoke/astream/abatch"):
        chat.invoke("Plan a weekend in Lisbon")
    with pytest.raises(RuntimeError, match="async-only"):
        next(iter(chat.stream("Plan a weekend in Lisbon")))
    assert sim.stats.requests == 0
