"""The OpenAI Agents SDK on its default path, the Responses API: `set_default_openai_client(wrapped)`.

In openai-agents 0.24 the default model provider (`MultiProvider`, then `OpenAIProvider`) resolves a
model name without a prefix to `OpenAIResponsesModel` on the default client, unless
`set_default_openai_api("chat_completions")` was called: `Agent(model="moa:duo")` then sends
`POST /responses` through the wrapped client (`responses.create`, or
`responses.with_streaming_response.create` for `Runner.run_streamed`). No glue is needed, and none
is set here beyond the client. The SDK's global defaults are put back after each test.

Everything runs on the embedded simulator with tracing off; a guard fails the test if anything
leaves loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    MultiProvider,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    RunResult,
    RunResultStreaming,
    function_tool,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.models import _openai_shared
from agents.tracing import processors

import moa_stream
from moa_stream import Preset
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
Run = Callable[..., Awaitable[RunResult | RunResultStreaming]]
PRESETS = {
    "duo": Preset(references=["ref-a", "ref-b"], aggregator="agg"),
    # an aggregator still streaming when the caller stops reading, however the bytes are buffered
    "slow": Preset(references=["ref-a", "ref-b"], aggregator="agg-slow"),
}
QUESTION = "What is the weather in Lisbon?"

set_tracing_disabled(True)  # nothing to export: the SDK's trace exporter would call api.openai.com

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def sim(native: bool) -> Simulator:
    names = ("ref-a", "ref-b", "agg", "plain")
    slow = SimModel(name="agg-slow", tokens_per_s=100.0)
    return Simulator([*(SimModel(name=name) for name in names), slow], responses=native)


@pytest.fixture(autouse=True)
def sdk_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's global defaults as they were, put back after the test (`set_default_openai_client`
    sets the default client and the trace exporter's key)."""
    for name in (
        "_default_openai_key",
        "_default_openai_client",
        "_use_responses_by_default",
        "_default_openai_responses_transport",
        "_use_responses_websocket_by_default",
    ):
        monkeypatch.setattr(_openai_shared, name, getattr(_openai_shared, name))
    exporter = processors.default_exporter()
    monkeypatch.setattr(exporter, "_api_key", exporter._api_key)
    # Nobody chose chat completions or the WebSocket transport: the SDK's defaults are in force.
    assert _openai_shared.get_use_responses_by_default()
    assert _openai_shared.get_default_openai_responses_transport() == "http"


def reported(result: RunResult | RunResultStreaming) -> list[tuple[int, int]]:
    """The (input, output) tokens the SDK recorded for each model response of the run."""
    return [(r.usage.input_tokens, r.usage.output_tokens) for r in result.raw_responses]


get_weather = function_tool(weather_function)


def weather_agent(model: str) -> Agent[Any]:
    """An agent that names its model by a string only: the SDK's default provider resolves it."""
    return Agent(name="planner", instructions="Answer briefly.", model=model, tools=[get_weather])


async def run(agent: Agent[Any], question: str, **options: Any) -> RunResult:
    return await Runner.run(agent, question, run_config=RunConfig(tracing_disabled=True), **options)


async def run_streamed(agent: Agent[Any], question: str, **options: Any) -> RunResultStreaming:
    result = Runner.run_streamed(agent, question, run_config=RunConfig(tracing_disabled=True), **options)
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


async def test_the_default_provider_resolves_a_responses_model_on_the_default_client(wrapped: Wrapped) -> None:
    client = wrapped(presets=PRESETS)
    set_default_openai_client(client)
    for name in ("moa:duo", "plain"):
        model = MultiProvider().get_model(name)
        assert isinstance(model, OpenAIResponsesModel)
        assert model._client is client


@NATIVE_OR_BRIDGED
async def test_moa_agent_runs_the_tool_the_aggregator_calls_and_reports_the_whole_usage(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run, native: bool
) -> None:
    weather_calls.clear()
    set_default_openai_client(wrapped(presets=PRESETS))
    result = await runner(weather_agent("moa:duo"), QUESTION)
    assert str(result.final_output).startswith("Based on the tool result")
    [arguments] = weather_calls  # the SDK ran the tool once, with the aggregator's arguments
    assert set(arguments) == {"city", "days"}
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == moa_tool_loop(native)
    assert not any(misplaced_chat_messages(r["messages"]) for r in sim.requests_seen if "messages" in r)
    assert reported(result) == [(turn.input_tokens, turn.output_tokens) for turn in metered]
    usage = result.context_wrapper.usage
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (
        2,
        sum(turn.input_tokens for turn in metered),
        sum(turn.output_tokens for turn in metered),
    )
    # the SDK asked through the Responses API, with the tool, and sent its output back
    assert [r["input"][-1].get("type") for r in sim.requests_seen if "input" in r] == (
        [None, "function_call_output"] if native else []
    )


async def test_plain_model_agent_is_metered_as_direct_responses_calls(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run
) -> None:
    weather_calls.clear()
    set_default_openai_client(wrapped(presets=PRESETS))
    result = await runner(weather_agent("plain"), QUESTION)
    assert str(result.final_output).startswith("Based on the tool result")
    assert len(weather_calls) == 1
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == [([("direct", "responses")], 0)] * 2
    assert reported(result) == [(turn.input_tokens, turn.output_tokens) for turn in metered]
    assert all(r["tools"][0]["name"] == "get_weather" for r in sim.requests_seen)


@NATIVE_OR_BRIDGED
async def test_moa_agent_chained_by_previous_response_id(
    wrapped: Wrapped, log: EventLog, sim: Simulator, runner: Run, native: bool
) -> None:
    """Not the default: `auto_previous_response_id=True` sends the tool's output alone, with the id
    of the response that called the tool, and the agent's `instructions` again, as every request."""
    set_default_openai_client(wrapped(presets=PRESETS))
    result = await runner(weather_agent("moa:duo"), QUESTION, auto_previous_response_id=True)
    assert str(result.final_output).startswith("Based on the tool result")
    metered = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in metered] == moa_tool_loop(native)
    assert reported(result) == [(turn.input_tokens, turn.output_tokens) for turn in metered]
    last = sim.requests_seen[-1]
    if native:  # the aggregator's upstream holds the conversation: the id goes there as it came
        assert last["previous_response_id"] == result.raw_responses[0].response_id
        assert [item["type"] for item in last["input"]] == ["function_call_output"]
    else:  # bridged, the whole conversation goes as a chat completion: one the upstream accepts
        assert misplaced_chat_messages(last["messages"]) == []


@NATIVE_OR_BRIDGED
async def test_streamed_run_cancelled_mid_answer_ends_the_turn_once(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]], native: bool
) -> None:
    set_default_openai_client(wrapped(presets=PRESETS))
    agent = Agent(name="planner", model="moa:slow")
    result = Runner.run_streamed(agent, "Plan a weekend in Lisbon", run_config=RunConfig(tracing_disabled=True))
    async for event in result.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            result.cancel()  # the SDK cancels its task and closes the stream under asyncio.shield
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    calls = sorted((c.role, c.api, c.status) for c in log.of(moa_stream.CallUsage))
    aggregator = [("aggregator", "responses", "cancelled")] if native else EARLY_BRIDGED["cancelled"]
    assert (end.status, calls) == ("cancelled", [*aggregator, *[("reference", "chat", "completed")] * 2])
    await sim_idle()
