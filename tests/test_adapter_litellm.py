"""LiteLLM's acompletion with a wrapped client (`client=`), streamed and not, with a tool loop.

Everything runs on the embedded simulator; a guard fails the test if anything leaves loopback, and
LiteLLM reads its price map from its own wheel instead of downloading it at import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import openai
import pytest

import moa_stream
from moa_stream import Preset
from moa_stream.adapters.litellm import acompletion_kwargs
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .frameworks import get_weather, metered_turns, weather_calls

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read by `import litellm`
import litellm

# LiteLLM's stream chunk builder reads pydantic fields the deprecated way: its noise, not ours.
pytestmark = [
    pytest.mark.usefixtures("offline"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211:litellm"),
]

Wrapped = Callable[..., openai.AsyncOpenAI]
PRESETS = {
    "duo": Preset(references=["ref-a", "ref-b"], aggregator="agg"),
    # an aggregator still streaming when the caller stops reading, however the bytes are buffered
    "slow": Preset(references=["ref-a", "ref-b"], aggregator="agg-slow"),
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


@pytest.fixture
def sim() -> Simulator:
    names = ("ref-a", "ref-b", "agg", "plain")
    return Simulator([*(SimModel(name=name) for name in names), SimModel(name="agg-slow", tokens_per_s=100.0)])


@pytest.fixture(autouse=True)
def bundled_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litellm, "disable_hf_tokenizer_download", True)  # token counts use the bundled tiktoken


class Reply(NamedTuple):
    """What LiteLLM gave back for one call: the assistant message and the usage it reported."""

    message: dict[str, Any]
    usage: tuple[int, int]


async def complete(client: openai.AsyncOpenAI, model: str, messages: list[Any], *, stream: bool) -> Reply:
    kwargs = acompletion_kwargs(client, model, stream=stream)
    response = await litellm.acompletion(messages=messages, tools=[WEATHER_TOOL], **kwargs)
    if stream:
        chunks = [chunk async for chunk in response]
        assert len(chunks) > 2  # it streamed
        [usage] = [chunk.usage for chunk in chunks if getattr(chunk, "usage", None)]  # one usage, at the end
        response = litellm.stream_chunk_builder(chunks, messages=messages)
        assert response is not None
    else:
        assert isinstance(response, litellm.ModelResponse)
        usage = response.usage
    message = response.choices[0].message.model_dump(exclude_none=True)
    return Reply(message, (usage.prompt_tokens, usage.completion_tokens))


async def tool_loop(client: openai.AsyncOpenAI, model: str, *, stream: bool) -> list[Reply]:
    """Ask, run the tool the model calls, send its result back: the loop an agent runs on LiteLLM."""
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    first = await complete(client, model, messages, stream=stream)
    [tool_call] = first.message["tool_calls"]
    result = get_weather(**json.loads(tool_call["function"]["arguments"]))
    messages += [first.message, {"role": "tool", "tool_call_id": tool_call["id"], "content": result}]
    second = await complete(client, model, messages, stream=stream)
    assert second.message["content"].startswith("Based on the tool result")
    return [first, second]


def test_acompletion_kwargs_route_the_call_through_the_client() -> None:
    client = openai.AsyncOpenAI(base_url="http://upstream.local/v1", api_key="sk-upstream")
    assert acompletion_kwargs(client, "moa:duo") == {
        "model": "openai/moa:duo",
        "client": client,
        "api_base": "http://upstream.local/v1/",
        "api_key": "sk-upstream",
    }
    streamed = acompletion_kwargs(client, "gpt-4.1", stream=True)
    assert (streamed["stream"], streamed["stream_options"]) == (True, {"include_usage": True})


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_moa_tool_loop_reports_each_turns_whole_usage(
    wrapped: Wrapped, log: EventLog, sim: Simulator, stream: bool
) -> None:
    weather_calls.clear()
    replies = await tool_loop(wrapped(presets=PRESETS), "moa:duo", stream=stream)
    assert len(weather_calls) == 1
    metered = await metered_turns(log, sim, 2)
    # the second call of the same user turn reuses the references: only the aggregator runs
    assert [turn.roles for turn in metered] == [["aggregator", "reference", "reference"], ["aggregator"]]
    assert [reply.usage for reply in replies] == [(turn.input_tokens, turn.output_tokens) for turn in metered]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_plain_model_tool_loop_is_metered_as_direct_calls(
    wrapped: Wrapped, log: EventLog, sim: Simulator, stream: bool
) -> None:
    replies = await tool_loop(wrapped(presets=PRESETS), "plain", stream=stream)
    metered = await metered_turns(log, sim, 2)
    assert [turn.roles for turn in metered] == [["direct"], ["direct"]]
    assert [reply.usage for reply in replies] == [(turn.input_tokens, turn.output_tokens) for turn in metered]


async def test_stream_closed_mid_answer_ends_the_turn_once(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]]
) -> None:
    messages = [{"role": "user", "content": "Plan a weekend in Lisbon"}]
    response = await litellm.acompletion(
        messages=messages, **acompletion_kwargs(wrapped(presets=PRESETS), "moa:slow", stream=True)
    )
    async for _ in response:
        break
    await response.aclose()  # LiteLLM's stream wrapper closes the SDK stream under a shielded scope
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    calls = {c.role: c.status for c in log.of(moa_stream.CallUsage)}
    assert (end.status, calls) == ("closed_early", {"reference": "completed", "aggregator": "closed_early"})
    await sim_idle()
