"""LiteLLM's Responses API (`litellm.aresponses`) metered by moa-stream.

LiteLLM 1.83 does not call an `AsyncOpenAI` on this path: `aresponses(model="openai/<m>", api_base=,
api_key=)` posts to `<api_base>/responses` with an HTTP handler of its own, and its `client=` takes
only one of those (`litellm.llms.custom_httpx.http_handler.AsyncHTTPHandler`). An `AsyncOpenAI`
given there, wrapped or not, is dropped without a word: the call goes out on LiteLLM's own HTTP
client, unmetered (`acompletion_kwargs`, which passes `client=` for chat, does not carry over).

What works, both tested here:

- In process: `moa_stream.adapters.litellm.aresponses_kwargs(client, model)`, whose HTTP handler sends
  each of LiteLLM's requests through the wrapped client (httpx or httpx2 alike).
- Over loopback HTTP: `moa-stream serve` in front of the wrapped client, and LiteLLM's `api_base`
  pointed at it; no glue.

LiteLLM fakes a stream for a model its model map lacks, so for every `moa:<preset>`: `stream=True`
sends one request without `stream` and replays the answer as events. A name registered as streaming
natively (`litellm.register_model`) streams for real. Both are tested.

Everything runs on the embedded simulator; a guard fails the test if anything leaves loopback, and
LiteLLM reads its price map from its own wheel instead of downloading it at import.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal, NamedTuple

import pytest

import moa_stream
from moa_stream import Preset
from moa_stream.adapters.litellm import aresponses_kwargs
from moa_stream.testing import Fault, SimModel, Simulator

from .conftest import EventLog
from .frameworks import (
    NATIVE_OR_BRIDGED,
    get_weather,
    metered_api_turns,
    misplaced_chat_messages,
    moa_tool_loop,
    weather_calls,
)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read by `import litellm`
import litellm
from litellm.caching.llm_caching_handler import LLMClientCache
from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients
from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

# LiteLLM's response types read pydantic fields the deprecated way, and its stream logging puts a
# chat-style usage dict into a ResponsesAPIResponse it then serializes: its noise, not ours.
pytestmark = [
    pytest.mark.usefixtures("offline"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211:litellm"),
    pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning"),
]

Mode = Literal["json", "fake-stream", "stream"]
PRESETS = {"duo": Preset(references=["ref-a", "ref-b"], aggregator="agg")}
QUESTION = "What is the weather in Lisbon?"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather forecast for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


@pytest.fixture
def sim(native: bool) -> Simulator:
    models = [SimModel(name=name) for name in ("ref-a", "ref-b", "agg", "plain")]
    return Simulator([*models, SimModel(name="limited", fault=Fault(kind="http_429"))], responses=native)


@pytest.fixture(autouse=True)
def bundled_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litellm, "disable_hf_tokenizer_download", True)  # token counts use the bundled tiktoken


@contextlib.contextmanager
def streaming_natively(*names: str) -> Iterator[None]:
    """LiteLLM's model map says `names` stream natively (so `stream=True` is not faked); put back after."""

    def forget() -> None:  # LiteLLM caches what it looked up in the map
        litellm.utils._invalidate_model_cost_lowercase_map()

    entry = {"litellm_provider": "openai", "mode": "responses", "supports_native_streaming": True}
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in names:
                patch.setitem(litellm.model_cost, name, entry)
            forget()
            yield
    finally:
        forget()


@pytest.fixture(params=["json", "fake-stream", "stream"])
def mode(request: pytest.FixtureRequest) -> Iterator[Mode]:
    """Not streamed; `stream=True` as LiteLLM does it for a model it does not know (faked); and
    `stream=True` for a model registered as streaming natively."""
    if request.param == "stream":
        with streaming_natively("moa:duo", "plain"):
            yield "stream"
    else:
        yield request.param


class Reply(NamedTuple):
    """What LiteLLM gave back for one call: its output items and the usage it reported."""

    output: list[dict[str, Any]]
    usage: tuple[int, int]


async def respond(kwargs: dict[str, Any], input: Any, mode: Mode) -> Reply:
    response = await litellm.aresponses(input=input, tools=[WEATHER_TOOL], stream=mode != "json", **kwargs)
    if mode != "json":
        events = [event async for event in response]
        if mode == "stream":
            assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
        [response] = [event.response for event in events if event.type == "response.completed"]
    assert isinstance(response, litellm.ResponsesAPIResponse)
    assert response.usage is not None
    output = [item if isinstance(item, dict) else item.model_dump() for item in response.output]
    return Reply(output, (response.usage.input_tokens, response.usage.output_tokens))


async def tool_loop(kwargs: dict[str, Any], mode: Mode) -> list[Reply]:
    """Ask, run the tool the model calls, send its result back: the loop an agent runs on LiteLLM."""
    weather_calls.clear()
    items: list[Any] = [{"role": "user", "content": QUESTION}]
    first = await respond(kwargs, items, mode)
    [call] = [item for item in first.output if item["type"] == "function_call"]
    result = get_weather(**json.loads(call["arguments"]))
    items += [
        {"type": "function_call", "call_id": call["call_id"], "name": call["name"], "arguments": call["arguments"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": result},
    ]
    second = await respond(kwargs, items, mode)
    [message] = [item for item in second.output if item["type"] == "message"]
    assert message["content"][0]["text"].startswith("Based on the tool result")
    assert len(weather_calls) == 1
    return [first, second]


def streamed(sim: Simulator, model: str) -> set[bool]:
    """Whether the requests for `model` that the simulator received asked for a stream."""
    return {r.get("stream") is True for r in sim.requests_seen if r["model"] == model}


@pytest.fixture
async def metered(wrapped: Any) -> AsyncIterator[dict[str, Any]]:
    """`aresponses` arguments for a metered call of `moa:duo` (set `model` for another)."""
    kwargs = aresponses_kwargs(wrapped(presets=PRESETS), "moa:duo")
    yield kwargs
    await kwargs["client"].close()


async def test_aresponses_kwargs_name_the_upstream_and_closing_the_handler_leaves_the_client_open(
    wrapped: Any, log: EventLog
) -> None:
    client = wrapped(presets=PRESETS)
    kwargs = aresponses_kwargs(client, "plain")
    handler = kwargs.pop("client")
    assert kwargs == {"model": "openai/plain", "api_base": str(client.base_url), "api_key": "sim-key"}
    await handler.close()  # what LiteLLM's handler does when collected
    response = await client.responses.create(model="plain", input=QUESTION)  # the wrapped client still works
    assert response.status == "completed"
    await moa_stream.flush(client)
    assert [call.status for call in log.of(moa_stream.CallUsage)] == ["completed"]


async def test_an_upstream_error_reaches_litellm_as_its_own_and_is_metered_once(wrapped: Any, log: EventLog) -> None:
    client = wrapped()
    kwargs = aresponses_kwargs(client, "limited")
    with pytest.raises(litellm.RateLimitError):
        await litellm.aresponses(input=QUESTION, **kwargs)
    await kwargs["client"].close()
    await moa_stream.flush(client)
    [call] = log.of(moa_stream.CallUsage)
    assert (call.api, call.model, call.status) == ("responses", "limited", "error")


@NATIVE_OR_BRIDGED
async def test_moa_tool_loop_reports_each_turns_whole_usage(
    metered: dict[str, Any], log: EventLog, sim: Simulator, mode: Mode, native: bool
) -> None:
    replies = await tool_loop(metered, mode)
    turns = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in turns] == moa_tool_loop(native)
    assert not any(misplaced_chat_messages(r["messages"]) for r in sim.requests_seen if "messages" in r)
    assert [reply.usage for reply in replies] == [(turn.input_tokens, turn.output_tokens) for turn in turns]
    assert streamed(sim, "agg") == {mode == "stream"}  # natively or bridged, as LiteLLM asked


async def test_plain_model_tool_loop_is_metered_as_direct_responses_calls(
    metered: dict[str, Any], log: EventLog, sim: Simulator, mode: Mode
) -> None:
    replies = await tool_loop({**metered, "model": "openai/plain"}, mode)
    turns = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in turns] == [([("direct", "responses")], 0)] * 2
    assert [reply.usage for reply in replies] == [(turn.input_tokens, turn.output_tokens) for turn in turns]
    assert streamed(sim, "plain") == {mode == "stream"}


@NATIVE_OR_BRIDGED
async def test_moa_tool_loop_through_moa_stream_serve(
    wrapped: Any, log: EventLog, sim: Simulator, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from moa_stream._server import Server, create_app

    monkeypatch.setattr(litellm, "disable_aiohttp_transport", True)
    handler = AsyncHTTPHandler()  # LiteLLM's own, plain one: the server does the metering
    async with Server(create_app(wrapped(presets=PRESETS)), port=0, graceful_timeout=5) as server:
        kwargs = {"model": "openai/moa:duo", "client": handler, "api_base": server.base_url, "api_key": "unused"}
        replies = await tool_loop(kwargs, "json")
    await handler.client.aclose()
    turns = await metered_api_turns(log, sim, 2)
    assert [(turn.calls, turn.probes) for turn in turns] == moa_tool_loop(native)
    assert not any(misplaced_chat_messages(r["messages"]) for r in sim.requests_seen if "messages" in r)
    assert [reply.usage for reply in replies] == [(turn.input_tokens, turn.output_tokens) for turn in turns]


@pytest.mark.parametrize("server", ["http"], indirect=True)
async def test_an_openai_client_given_to_aresponses_is_ignored_and_the_call_unmetered(
    wrapped: Any, log: EventLog, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What to avoid: `client=` an AsyncOpenAI, as `acompletion` takes it. LiteLLM uses a cached
    handler of its own instead (a fresh cache here, closed afterwards)."""
    client = wrapped(presets=PRESETS)
    monkeypatch.setattr(litellm, "in_memory_llm_clients_cache", LLMClientCache())
    monkeypatch.setattr(litellm, "disable_aiohttp_transport", True)
    kwargs = {"model": "openai/plain", "client": client, "api_base": str(client.base_url), "api_key": client.api_key}
    try:
        response = await litellm.aresponses(input=QUESTION, **kwargs)
    finally:
        await close_litellm_async_clients()  # type: ignore[no-untyped-call]
    assert response.usage is not None
    assert sim.stats.requests_by_model == {"plain": 1}  # it reached the upstream...
    await moa_stream.flush(client)
    assert log.of(moa_stream.CallUsage) == []  # ...and nothing metered it
