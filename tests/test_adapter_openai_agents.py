"""The OpenAI Agents SDK on a wrapped client: OpenAIChatCompletionsModel, Runner.run and run_streamed.

No glue is needed: the wrapped client goes straight into `OpenAIChatCompletionsModel`. Everything
runs on the embedded simulator with tracing off; a guard fails the test if anything leaves loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    RunConfig,
    Runner,
    RunResult,
    RunResultStreaming,
    function_tool,
    set_tracing_disabled,
)
from agents.retry import ModelRetrySettings

import moa_stream
from moa_stream import Preset
from moa_stream._sdk import find_engine
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .frameworks import get_weather as weather_function
from .frameworks import metered_turns, weather_calls

Wrapped = Callable[..., openai.AsyncOpenAI]
Run = Callable[[Agent[Any], str], Awaitable[RunResult | RunResultStreaming]]
PRESETS = {
    "duo": Preset(references=["ref-a", "ref-b"], aggregator="agg"),
    # an aggregator still streaming when the caller stops reading, however the bytes are buffered
    "slow": Preset(references=["ref-a", "ref-b"], aggregator="agg-slow"),
}
QUESTION = "What is the weather in Lisbon?"

set_tracing_disabled(True)  # nothing to export: the SDK's trace exporter would call api.openai.com

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def sim() -> Simulator:
    names = ("ref-a", "ref-b", "agg", "plain")
    return Simulator([*(SimModel(name=name) for name in names), SimModel(name="agg-slow", tokens_per_s=100.0)])


def reported(result: RunResult | RunResultStreaming) -> list[tuple[int, int]]:
    """The (input, output) tokens the SDK recorded for each model response of the run."""
    return [(r.usage.input_tokens, r.usage.output_tokens) for r in result.raw_responses]


get_weather = function_tool(weather_function)


def weather_agent(client: openai.AsyncOpenAI, model: str, **settings: Any) -> Agent[Any]:
    return Agent(
        name="planner",
        instructions="Answer briefly.",
        model=OpenAIChatCompletionsModel(model=model, openai_client=client),
        # Usage of streams is only requested by default on api.openai.com.
        model_settings=ModelSettings(include_usage=True, **settings),
        tools=[get_weather],
    )


async def run(agent: Agent[Any], question: str) -> RunResult:
    return await Runner.run(agent, question, run_config=RunConfig(tracing_disabled=True))


async def run_streamed(agent: Agent[Any], question: str) -> RunResultStreaming:
    result = Runner.run_streamed(agent, question, run_config=RunConfig(tracing_disabled=True))
    deltas = [
        event
        async for event in result.stream_events()
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"
    ]
    assert len(deltas) > 1  # the answer streamed, token by token
    return result


@pytest.fixture(params=["run", "run_streamed"])
def runner(request: pytest.FixtureRequest) -> Run:
    return run if request.param == "run" else run_streamed


async def test_moa_agent_runs_the_tool_the_aggregator_calls_and_reports_the_whole_usage(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run
) -> None:
    weather_calls.clear()
    result = await runner(weather_agent(wrapped(presets=PRESETS), "moa:duo"), QUESTION)
    assert str(result.final_output).startswith("Based on the tool result")
    [arguments] = weather_calls  # the SDK ran the tool once, with the aggregator's arguments
    assert set(arguments) == {"city", "days"}
    metered = await metered_turns(log, sim, 2)
    # the second call of the same user turn reuses the references: only the aggregator runs
    assert [turn.roles for turn in metered] == [["aggregator", "reference", "reference"], ["aggregator"]]
    assert reported(result) == [(turn.input_tokens, turn.output_tokens) for turn in metered]
    usage = result.context_wrapper.usage
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (
        2,
        sum(turn.input_tokens for turn in metered),
        sum(turn.output_tokens for turn in metered),
    )


async def test_plain_model_agent_is_metered_as_direct_calls(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run
) -> None:
    result = await runner(weather_agent(wrapped(presets=PRESETS), "plain"), QUESTION)
    assert str(result.final_output).startswith("Based on the tool result")
    metered = await metered_turns(log, sim, 2)
    assert [turn.roles for turn in metered] == [["direct"], ["direct"]]
    assert reported(result) == [(turn.input_tokens, turn.output_tokens) for turn in metered]


async def test_no_retry_settings_go_through_with_options_and_stay_metered(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = wrapped(presets=PRESETS)
    copies: list[openai.AsyncOpenAI] = []

    def with_options(**options: Any) -> openai.AsyncOpenAI:
        assert options == {"max_retries": 0}
        copies.append(type(client).with_options(client, **options))
        return copies[-1]

    monkeypatch.setattr(client, "with_options", with_options)
    result = await runner(weather_agent(client, "moa:duo", retry=ModelRetrySettings(max_retries=0)), QUESTION)
    assert copies  # the SDK sent its requests through no-retry copies (it asks for several per request)
    assert all(find_engine(copy) is find_engine(client) for copy in copies)
    metered = await metered_turns(log, sim, 2)
    assert reported(result) == [(turn.input_tokens, turn.output_tokens) for turn in metered]


async def test_streamed_run_cancelled_mid_answer_ends_the_turn_once(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]]
) -> None:
    chat_agent = Agent(
        name="planner",
        model=OpenAIChatCompletionsModel(model="moa:slow", openai_client=wrapped(presets=PRESETS)),
        model_settings=ModelSettings(include_usage=True),
    )
    result = Runner.run_streamed(chat_agent, "Plan a weekend in Lisbon", run_config=RunConfig(tracing_disabled=True))
    async for event in result.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            result.cancel()  # the SDK cancels its task and closes the stream under asyncio.shield
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    calls = {c.role: c.status for c in log.of(moa_stream.CallUsage)}
    assert (end.status, calls) == ("cancelled", {"reference": "completed", "aggregator": "cancelled"})
    await sim_idle()
