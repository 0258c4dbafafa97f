"""LangChain's ChatOpenAI on the Responses API: `chat_openai(wrapped, model, use_responses_api=True)`.

In langchain-openai 1.7 `ChatOpenAI` calls chat completions unless told otherwise: it switches to the
Responses API with `use_responses_api=True`, and by itself for reasoning options, built-in tools,
`use_previous_response_id` and a few models (codex, gpt-5*-pro). It then calls
`root_async_client.responses`: `with_raw_response.create` for `ainvoke`, `create(stream=True)` in
`async with` for `astream`. `chat_openai` builds it on the wrapped client as for chat; no glue.

Everything runs on the embedded simulator; a guard fails the test if anything leaves loopback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.tools import tool

import moa_stream
from moa_stream import Preset
from moa_stream.adapters.langchain import chat_openai
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .frameworks import (
    EARLY_BRIDGED,
    NATIVE_OR_BRIDGED,
    metered_api_turns,
    misplaced_chat_messages,
    moa_tool_loop,
    weather_calls,
)
from .frameworks import (
    get_weather as weather_function,
)

Wrapped = Callable[..., openai.AsyncOpenAI]
Call = Callable[[Any, list[BaseMessage]], Awaitable[BaseMessage]]
PRESETS = {
    "duo": Preset(references=["ref-a", "ref-b"], aggregator="agg"),
    # an aggregator still streaming when the caller stops reading, however the bytes are buffered
    "slow": Preset(references=["ref-a", "ref-b"], aggregator="agg-slow"),
}

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def sim(native: bool) -> Simulator:
    names = ("ref-a", "ref-b", "agg", "plain")
    slow = SimModel(name="agg-slow", tokens_per_s=100.0)
    return Simulator([*(SimModel(name=name) for name in names), slow], responses=native)


def reported(message: BaseMessage) -> tuple[int, int]:
    assert isinstance(message, AIMessage)
    assert message.usage_metadata is not None
    return message.usage_metadata["input_tokens"], message.usage_metadata["output_tokens"]


def text_of(message: BaseMessage) -> str:
    """The text of a Responses API answer (LangChain keeps its content blocks)."""
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(str(block.get("text", "")) for block in content if isinstance(block, dict))


get_weather = tool(weather_function)


async def streamed(chat: Any, messages: list[BaseMessage]) -> AIMessageChunk:
    message: AIMessageChunk | None = None
    chunks = 0
    async for chunk in chat.astream(messages):
        message = chunk if message is None else message + chunk
        chunks += 1
    assert message is not None
    assert chunks > 2  # it streamed
    return message


async def invoked(chat: Any, messages: list[BaseMessage]) -> BaseMessage:
    message: BaseMessage = await chat.ainvoke(messages)
    return message


@pytest.fixture(params=["astream", "ainvoke"])
def call(request: pytest.FixtureRequest) -> Call:
    """One model call through LangChain: `astream` or `ainvoke` (with_raw_response)."""
    return streamed if request.param == "astream" else invoked


async def tool_loop(chat: Any, call: Call) -> list[BaseMessage]:
    """Ask, run the tool the model calls, send its result back: LangChain's own tool loop."""
    weather_calls.clear()
    messages: list[BaseMessage] = [HumanMessage("What is the weather in Lisbon?")]
    first = await call(chat, messages)
    assert isinstance(first, AIMessage)
    [tool_call] = first.tool_calls
    messages += [first, await get_weather.ainvoke(tool_call)]
    second = await call(chat, messages)
    assert text_of(second).startswith("Based on the tool result")
    assert weather_calls == [tool_call["args"]]
    return [first, second]


async def test_use_responses_api_is_kept_by_chat_openai(wrapped: Wrapped) -> None:
    client = wrapped(presets=PRESETS)
    chat = chat_openai(client, "moa:duo", use_responses_api=True)
    assert chat.use_responses_api is True
    assert chat.root_async_client is client


@NATIVE_OR_BRIDGED
async def test_moa_tool_loop_reports_each_turns_whole_usage(
    wrapped: Wrapped, log: EventLog, sim: Simulator, call: Call, native: bool
) -> None:
    chat = chat_openai(wrapped(presets=PRESETS), "moa:duo", use_responses_api=True).bind_tools([get_weather])
    first, second = await tool_loop(chat, call)
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == moa_tool_loop(native)
    assert not any(misplaced_chat_messages(r["messages"]) for r in sim.requests_seen if "messages" in r)
    assert [reported(first), reported(second)] == [(t.input_tokens, t.output_tokens) for t in metered]


async def test_plain_model_tool_loop_is_metered_as_direct_responses_calls(
    wrapped: Wrapped, log: EventLog, sim: Simulator, call: Call
) -> None:
    chat = chat_openai(wrapped(presets=PRESETS), "plain", use_responses_api=True).bind_tools([get_weather])
    first, second = await tool_loop(chat, call)
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == [([("direct", "responses")], 0)] * 2
    assert [reported(first), reported(second)] == [(t.input_tokens, t.output_tokens) for t in metered]
    assert all(r["tools"][0]["name"] == "get_weather" for r in sim.requests_seen)


@NATIVE_OR_BRIDGED
async def test_moa_tool_loop_continued_by_previous_response_id(
    wrapped: Wrapped, log: EventLog, sim: Simulator, call: Call, native: bool
) -> None:
    # the option alone switches to the Responses API (the calls' API below shows it)
    chat = chat_openai(wrapped(presets=PRESETS), "moa:duo", use_previous_response_id=True)
    first, second = await tool_loop(chat.bind_tools([get_weather]), call)
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == moa_tool_loop(native)
    assert not any(misplaced_chat_messages(r["messages"]) for r in sim.requests_seen if "messages" in r)
    assert [reported(first), reported(second)] == [(t.input_tokens, t.output_tokens) for t in metered]
    # LangChain sent only the tool's output, with the id of the response that called the tool
    assert first.response_metadata["id"].startswith("resp_")
    if native:  # the aggregator's upstream holds the conversation: the id goes there as it came
        last = sim.requests_seen[-1]
        assert last["previous_response_id"] == first.response_metadata["id"]
        assert [item["type"] for item in last["input"]] == ["function_call_output"]


@NATIVE_OR_BRIDGED
async def test_astream_closed_after_one_chunk_ends_the_turn_once(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]], native: bool
) -> None:
    chat = chat_openai(wrapped(presets=PRESETS), "moa:slow", use_responses_api=True)
    async with contextlib.aclosing(chat.astream("Plan a weekend in Lisbon")) as stream:
        async for _ in stream:
            break
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    calls = sorted((c.role, c.api, c.status) for c in log.of(moa_stream.CallUsage))
    aggregator = [("aggregator", "responses", "closed_early")] if native else EARLY_BRIDGED["closed_early"]
    assert (end.status, calls) == ("closed_early", [*aggregator, *[("reference", "chat", "completed")] * 2])
    await sim_idle()
