"""pydantic-ai on a wrapped client: OpenAIChatModel with OpenAIProvider(openai_client=...), run and run_stream.

No glue is needed: the wrapped client goes straight into `OpenAIProvider`. Everything runs on the
embedded simulator; a guard fails the test if anything leaves loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import openai
import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RunUsage

import moa_stream
from moa_stream import Preset
from moa_stream._sdk import find_engine
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .frameworks import get_weather, metered_turns, weather_calls

Wrapped = Callable[..., openai.AsyncOpenAI]
PRESETS = {
    "duo": Preset(references=["ref-a", "ref-b"], aggregator="agg"),
    # an aggregator still streaming when the caller stops reading, however the bytes are buffered
    "slow": Preset(references=["ref-a", "ref-b"], aggregator="agg-slow"),
}
QUESTION = "What is the weather in Lisbon?"

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def sim() -> Simulator:
    names = ("ref-a", "ref-b", "agg", "plain")
    return Simulator([*(SimModel(name=name) for name in names), SimModel(name="agg-slow", tokens_per_s=100.0)])


class Outcome(NamedTuple):
    """What a run gave back: its output, messages and usage."""

    output: str
    messages: list[ModelMessage]
    usage: RunUsage

    def reported(self) -> list[tuple[int, int]]:
        """The (input, output) tokens pydantic-ai recorded for each model response."""
        responses = [m for m in self.messages if isinstance(m, ModelResponse)]
        return [(r.usage.input_tokens, r.usage.output_tokens) for r in responses]


def weather_agent(client: openai.AsyncOpenAI, model: str, settings: ModelSettings | None = None) -> Agent[None, str]:
    chat_model = OpenAIChatModel(model, provider=OpenAIProvider(openai_client=client))
    return Agent(chat_model, instructions="Answer briefly.", tools=[get_weather], model_settings=settings)


async def run(agent: Agent[None, str], question: str) -> Outcome:
    result = await agent.run(question)
    return Outcome(result.output, result.all_messages(), result.usage)


async def run_stream(agent: Agent[None, str], question: str) -> Outcome:
    async with agent.run_stream(question) as result:
        deltas = [delta async for delta in result.stream_text(delta=True, debounce_by=None)]
        assert len(deltas) > 1  # the answer streamed, token by token
        return Outcome("".join(deltas), result.all_messages(), result.usage)


Run = Callable[[Agent[None, str], str], Awaitable[Outcome]]


@pytest.fixture(params=["run", "run_stream"])
def runner(request: pytest.FixtureRequest) -> Run:
    return run if request.param == "run" else run_stream


async def test_provider_keeps_the_wrapped_client(wrapped: Wrapped) -> None:
    client = wrapped(presets=PRESETS)
    assert OpenAIProvider(openai_client=client).client is client


async def test_moa_agent_runs_the_tool_the_aggregator_calls_and_reports_the_whole_usage(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run
) -> None:
    weather_calls.clear()
    outcome = await runner(weather_agent(wrapped(presets=PRESETS), "moa:duo"), QUESTION)
    assert outcome.output.startswith("Based on the tool result")
    [arguments] = weather_calls  # pydantic-ai ran the tool once, with the aggregator's arguments
    assert set(arguments) == {"city", "days"}
    metered = await metered_turns(log, sim, 2)
    # the second call of the same user turn reuses the references: only the aggregator runs
    assert [turn.roles for turn in metered] == [["aggregator", "reference", "reference"], ["aggregator"]]
    assert outcome.reported() == [(turn.input_tokens, turn.output_tokens) for turn in metered]
    assert (outcome.usage.requests, outcome.usage.input_tokens, outcome.usage.output_tokens) == (
        2,
        sum(turn.input_tokens for turn in metered),
        sum(turn.output_tokens for turn in metered),
    )


async def test_plain_model_agent_is_metered_as_direct_calls(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run
) -> None:
    outcome = await runner(weather_agent(wrapped(presets=PRESETS), "plain"), QUESTION)
    assert outcome.output.startswith("Based on the tool result")
    metered = await metered_turns(log, sim, 2)
    assert [turn.roles for turn in metered] == [["direct"], ["direct"]]
    assert outcome.reported() == [(turn.input_tokens, turn.output_tokens) for turn in metered]


async def test_max_retries_setting_goes_through_with_options_and_stays_metered(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = wrapped(presets=PRESETS)
    copies: list[openai.AsyncOpenAI] = []

    def with_options(**options: Any) -> openai.AsyncOpenAI:
        # pydantic-ai hands the copy the private `client._client`, the wrapped HTTP client
        assert options["http_client"] is client._client
        copies.append(type(client).with_options(client, **options))
        return copies[-1]

    monkeypatch.setattr(client, "with_options", with_options)
    outcome = await runner(weather_agent(client, "moa:duo", ModelSettings(max_retries=0)), QUESTION)
    assert [copy.max_retries for copy in copies] == [0, 0]
    assert all(find_engine(copy) is find_engine(client) for copy in copies)
    metered = await metered_turns(log, sim, 2)
    assert outcome.reported() == [(turn.input_tokens, turn.output_tokens) for turn in metered]


async def test_run_stream_left_mid_answer_ends_the_turn_once(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]]
) -> None:
    chat_agent = Agent(OpenAIChatModel("moa:slow", provider=OpenAIProvider(openai_client=wrapped(presets=PRESETS))))
    async with chat_agent.run_stream("Plan a weekend in Lisbon") as result:
        async for _ in result.stream_text(delta=True, debounce_by=None):
            break  # leaving `async with` closes the stream (pydantic-ai awaits stream.close())
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    calls = {c.role: c.status for c in log.of(moa_stream.CallUsage)}
    assert (end.status, calls) == ("closed_early", {"reference": "completed", "aggregator": "closed_early"})
    await sim_idle()
