"""pydantic-ai on the Responses API: OpenAIResponsesModel with OpenAIProvider(openai_client=wrapped).

In pydantic-ai 2.68 the `openai:` prefix means `OpenAIResponsesModel` (`openai-chat:` keeps chat
completions). `Agent("openai:<model>")` alone builds its own `OpenAIProvider()`, whose client comes
from the environment and cannot be the wrapped one; the string path takes a client through
`infer_model("openai:<model>", provider_factory=...)`, or, keeping the string on the agent, through a
`ResolveModelId` capability that resolves it that way at run time. No other glue is needed.

Everything runs on the embedded simulator; a guard fails the test if anything leaves loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import openai
import pytest
from pydantic_ai import Agent
from pydantic_ai.capabilities import ResolveModelId
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model, ModelResolutionContext, infer_model
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel, OpenAIResponsesModelSettings
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.usage import RunUsage

import moa_stream
from moa_stream import Preset
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .frameworks import (
    EARLY_BRIDGED,
    NATIVE_OR_BRIDGED,
    get_weather,
    metered_api_turns,
    misplaced_chat_messages,
    moa_tool_loop,
    weather_calls,
)

Wrapped = Callable[..., openai.AsyncOpenAI]
PRESETS = {
    "duo": Preset(references=["ref-a", "ref-b"], aggregator="agg"),
    # an aggregator still streaming when the caller stops reading, however the bytes are buffered
    "slow": Preset(references=["ref-a", "ref-b"], aggregator="agg-slow"),
}
QUESTION = "What is the weather in Lisbon?"

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def sim(native: bool) -> Simulator:
    names = ("ref-a", "ref-b", "agg", "plain")
    slow = SimModel(name="agg-slow", tokens_per_s=100.0)
    return Simulator([*(SimModel(name=name) for name in names), slow], responses=native)


class Outcome(NamedTuple):
    """What a run gave back: its output, messages and usage."""

    output: str
    messages: list[ModelMessage]
    usage: RunUsage

    def reported(self) -> list[tuple[int, int]]:
        """The (input, output) tokens pydantic-ai recorded for each model response."""
        responses = [m for m in self.messages if isinstance(m, ModelResponse)]
        return [(r.usage.input_tokens, r.usage.output_tokens) for r in responses]


def responses_model(client: openai.AsyncOpenAI, model: str) -> OpenAIResponsesModel:
    return OpenAIResponsesModel(model, provider=OpenAIProvider(openai_client=client))


def weather_agent(model: Model | str, **options: Any) -> Agent[None, str]:
    return Agent(model, instructions="Answer briefly.", tools=[get_weather], **options)


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


async def test_the_openai_prefix_means_the_responses_api(wrapped: Wrapped) -> None:
    client = wrapped(presets=PRESETS)
    # On its own the prefix builds a provider of its own: a client from the environment, unmetered.
    default = infer_model("openai:moa:duo")
    assert isinstance(default, OpenAIResponsesModel)
    assert (default.model_name, default.client is client) == ("moa:duo", False)
    assert isinstance(infer_model("openai-chat:moa:duo"), OpenAIChatModel)
    # With a provider factory the same string is a Responses model on the wrapped client.
    given = infer_model("openai:moa:duo", provider_factory=lambda name: OpenAIProvider(openai_client=client))
    assert isinstance(given, OpenAIResponsesModel)
    assert (given.model_name, given.client) == ("moa:duo", client)


@NATIVE_OR_BRIDGED
async def test_moa_agent_runs_the_tool_the_aggregator_calls_and_reports_the_whole_usage(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run, native: bool
) -> None:
    weather_calls.clear()
    outcome = await runner(weather_agent(responses_model(wrapped(presets=PRESETS), "moa:duo")), QUESTION)
    assert outcome.output.startswith("Based on the tool result")
    [arguments] = weather_calls  # pydantic-ai ran the tool once, with the aggregator's arguments
    assert set(arguments) == {"city", "days"}
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == moa_tool_loop(native)
    assert not any(misplaced_chat_messages(r["messages"]) for r in sim.requests_seen if "messages" in r)
    assert outcome.reported() == [(turn.input_tokens, turn.output_tokens) for turn in metered]
    assert (outcome.usage.requests, outcome.usage.input_tokens, outcome.usage.output_tokens) == (
        2,
        sum(turn.input_tokens for turn in metered),
        sum(turn.output_tokens for turn in metered),
    )


async def test_plain_model_agent_is_metered_as_direct_responses_calls(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run
) -> None:
    weather_calls.clear()
    outcome = await runner(weather_agent(responses_model(wrapped(presets=PRESETS), "plain")), QUESTION)
    assert outcome.output.startswith("Based on the tool result")
    assert len(weather_calls) == 1
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == [([("direct", "responses")], 0)] * 2
    assert outcome.reported() == [(turn.input_tokens, turn.output_tokens) for turn in metered]
    assert all(r["tools"][0]["name"] == "get_weather" for r in sim.requests_seen)


@NATIVE_OR_BRIDGED
async def test_the_openai_model_string_resolved_on_the_wrapped_client(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run, native: bool
) -> None:
    client = wrapped(presets=PRESETS)
    resolved: list[str] = []

    def on_the_wrapped_client(ctx: ModelResolutionContext[None], model_id: str) -> Model:
        resolved.append(model_id)
        return infer_model(model_id, provider_factory=lambda name: OpenAIProvider(openai_client=client))

    agent = weather_agent("openai:moa:duo", capabilities=[ResolveModelId(on_the_wrapped_client)])
    outcome = await runner(agent, QUESTION)
    assert outcome.output.startswith("Based on the tool result")
    assert set(resolved) == {"openai:moa:duo"}
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == moa_tool_loop(native)
    assert outcome.reported() == [(turn.input_tokens, turn.output_tokens) for turn in metered]


@NATIVE_OR_BRIDGED
async def test_moa_agent_chained_by_previous_response_id(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run, native: bool
) -> None:
    """Not the default: `openai_previous_response_id="auto"` sends the tool's output alone, with the
    id of the response that called the tool, and the agent's `instructions` again, as every request."""
    settings = OpenAIResponsesModelSettings(openai_previous_response_id="auto")
    agent = weather_agent(responses_model(wrapped(presets=PRESETS), "moa:duo"), model_settings=settings)
    outcome = await runner(agent, QUESTION)
    assert outcome.output.startswith("Based on the tool result")
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == moa_tool_loop(native)
    assert outcome.reported() == [(turn.input_tokens, turn.output_tokens) for turn in metered]
    last = sim.requests_seen[-1]
    if native:  # the aggregator's upstream holds the conversation: the id goes there as it came
        first = next(m for m in outcome.messages if isinstance(m, ModelResponse))
        assert last["previous_response_id"] == first.provider_response_id
        assert [item["type"] for item in last["input"]] == ["function_call_output"]
    else:  # bridged, the whole conversation goes as a chat completion: one the upstream accepts
        assert misplaced_chat_messages(last["messages"]) == []


@NATIVE_OR_BRIDGED
async def test_run_stream_left_mid_answer_ends_the_turn_once(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]], native: bool
) -> None:
    agent = Agent(responses_model(wrapped(presets=PRESETS), "moa:slow"))
    async with agent.run_stream("Plan a weekend in Lisbon") as result:
        async for _ in result.stream_text(delta=True, debounce_by=None):
            break  # leaving `async with` closes the stream (pydantic-ai awaits stream.close())
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    calls = sorted((c.role, c.api, c.status) for c in log.of(moa_stream.CallUsage))
    aggregator = [("aggregator", "responses", "closed_early")] if native else EARLY_BRIDGED["closed_early"]
    assert (end.status, calls) == ("closed_early", [*aggregator, *[("reference", "chat", "completed")] * 2])
    await sim_idle()
