"""The cost a framework reports for what it got from a wrapped client is ours, or none: never the
turn's tokens priced at the aggregator's rate. The real LiteLLM and pydantic-ai, their own price
tables (LiteLLM's bundled map, pydantic-ai's genai-prices), on the simulator serving real model
names, so both frameworks know the aggregator's price."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import openai
import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

import moa_stream
from moa_stream import Preset
from moa_stream.adapters.litellm import acompletion_kwargs
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read by `import litellm`
import litellm

pytestmark = [
    pytest.mark.usefixtures("offline"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211:litellm"),
]

Wrapped = Callable[..., openai.AsyncOpenAI]
QUESTION = [{"role": "user", "content": "What is the weather in Lisbon?"}]


def presets(usage: str) -> dict[str, Preset]:
    # Real names: were the answer to name the aggregator with the turn's usage, both frameworks
    # would price every reference's tokens at gpt-4o's rate.
    return {
        "duo": Preset(references=["gpt-4o-mini", "gpt-4.1-mini"], aggregator="gpt-4o", usage=usage, cadence="per_call")  # type: ignore[arg-type]
    }


@pytest.fixture
def sim() -> Simulator:
    return Simulator([SimModel(name=name) for name in ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o")])


@pytest.fixture(autouse=True)
def bundled_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litellm, "disable_hf_tokenizer_download", True)


async def ours(log: EventLog, count: int) -> list[moa_stream.TurnEnd]:
    await log.wait_turns(count)
    return sorted(log.of(moa_stream.TurnEnd), key=lambda end: end.started_at)


async def litellm_cost(client: openai.AsyncOpenAI, model: str) -> float | None:
    response = await litellm.acompletion(messages=QUESTION, **acompletion_kwargs(client, model))
    try:
        return float(litellm.completion_cost(completion_response=response))
    except Exception:  # no price for the model it names: no cost, which is honest
        return None


async def pydantic_ai_cost(client: openai.AsyncOpenAI, model: str) -> float | None:
    agent = Agent(OpenAIChatModel(model, provider=OpenAIProvider(openai_client=client)))
    result = await agent.run("What is the weather in Lisbon?")
    [response] = [message for message in result.all_messages() if isinstance(message, ModelResponse)]
    try:
        return float(response.cost().total_price)
    except LookupError:
        return None


COSTS: dict[str, Callable[[openai.AsyncOpenAI, str], Any]] = {"litellm": litellm_cost, "pydantic-ai": pydantic_ai_cost}


@pytest.mark.parametrize("framework", sorted(COSTS))
async def test_a_moa_turns_cost_in_a_framework_is_ours_or_none(wrapped: Wrapped, log: EventLog, framework: str) -> None:
    client = wrapped(presets=presets("turn"))
    reported = await COSTS[framework](client, "moa:duo")
    [turn] = await ours(log, 1)
    assert turn.cost_complete
    assert reported is None or reported == pytest.approx(turn.cost_usd)


@pytest.mark.parametrize("framework", sorted(COSTS))
async def test_with_the_aggregators_usage_a_framework_prices_the_aggregators_call_as_we_do(
    wrapped: Wrapped, log: EventLog, framework: str
) -> None:
    client = wrapped(presets=presets("aggregator"))
    reported = await COSTS[framework](client, "moa:duo")
    await ours(log, 1)
    [aggregator] = [call for call in log.of(moa_stream.CallUsage) if call.role == "aggregator"]
    assert reported is None or reported == pytest.approx(aggregator.cost_usd)


@pytest.mark.parametrize("framework", sorted(COSTS))
async def test_a_plain_models_cost_in_a_framework_equals_ours(wrapped: Wrapped, log: EventLog, framework: str) -> None:
    client = wrapped()
    reported = await COSTS[framework](client, "gpt-4o-mini")
    [turn] = await ours(log, 1)
    assert reported == pytest.approx(turn.cost_usd)
