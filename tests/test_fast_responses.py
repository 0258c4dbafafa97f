"""Fast mode builds the same objects as the SDK for non-streamed chat and the Responses API (whole
responses and stream events): equal dumps, reprs (so the same classes all the way down), fields set
and request ids, on every way of calling, with strict validation's refusals left to the SDK."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union

import openai
import pydantic
import pytest
from openai._models import construct_type
from openai._utils import PropertyInfo
from openai.types.responses import Response, ResponseStreamEvent

import moa_stream
from moa_stream._fast import validate_response, variants_by_tag
from moa_stream._sdk import specialize

from .scripted import (
    OPENAI_RESPONSES_USAGE,
    SSE,
    Reply,
    Request,
    ScriptedUpstream,
    event_stream,
    openai_response,
    openai_response_events,
)

USER = [{"role": "user", "content": "Tell me about streams"}]
WORDS = ["Streams", "carry", "tokens"]


def declared_fields_set(obj: Any) -> frozenset[str]:
    """`model_fields_set` without the fields the SDK's model does not declare: its own construction
    leaves those out, where validation counts them (both openai lines; OpenAI's `store` on a Response
    is one), the one known difference between the two (see tests/test_provider_bytes.py)."""
    return frozenset(obj.model_fields_set - (obj.model_extra or {}).keys())


def message(text: str) -> dict[str, Any]:
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    return {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}


REASONING = {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Thinking."}]}
FUNCTION_CALL = {
    "id": "fc_1",
    "type": "function_call",
    "status": "completed",
    "call_id": "call_1",
    "name": "weather",
    "arguments": '{"city":"Oslo"}',
}
WEATHER_TOOL = {
    "type": "function",
    "name": "weather",
    "description": None,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


# `cache_write_tokens` is required by openai 3.x's model: without it strict validation refuses the
# usage (scripted.OPENAI_RESPONSES_USAGE, older bytes) and the SDK builds it, as
# `older_usage_bytes` checks below.
USAGE = {**OPENAI_RESPONSES_USAGE, "input_tokens_details": {"cached_tokens": 12, "cache_write_tokens": 0}}


def response(**fields: Any) -> dict[str, Any]:
    return {**openai_response("gpt-4.1", "completed", [message("Hi")], USAGE), **fields}


# Built by validation: what OpenAI and the simulator send.
RESPONSES = {
    "message": response(),
    "reasoning_and_tool_call": response(output=[REASONING, FUNCTION_CALL], tools=[WEATHER_TOOL]),
    "incomplete": response(status="incomplete", incomplete_details={"reason": "max_output_tokens"}),
    "no_usage": response(usage=None),
}
# Refused by strict validation, so built by the SDK: a provider's own enum value, a member no union
# knows. Extra fields are kept by validation (the models allow them) and must dump alike too.
RESPONSE_FALLBACKS = {
    "unknown_status": response(status="queued_by_gateway"),
    "older_usage_bytes": response(usage=OPENAI_RESPONSES_USAGE),
    "unknown_output_item": response(output=[{"type": "gateway_note", "id": "n_1", "text": "x"}]),
}
RESPONSE_EXTRAS = {
    "extra_top_level_field": response(provider="OpenRouter", cost=0.0012),
    "extra_nested_field": response(output=[{**message("Hi"), "x_trace": {"span": 1}}]),
}

EVENTS = {
    f"{i}:{event['type']}": event
    for i, event in enumerate(openai_response_events(WORDS, reasoning=["Think."], usage=USAGE))
}
EVENTS["args_delta"] = {
    "type": "response.function_call_arguments.delta",
    "sequence_number": 3,
    "item_id": "fc_1",
    "output_index": 0,
    "delta": '{"ci',
}
EVENT_FALLBACKS = {
    "unknown_event_type": {"type": "response.gateway.heartbeat", "sequence_number": 1},
    "unknown_status_in_response": {
        "type": "response.completed",
        "sequence_number": 9,
        "response": response(status="queued_by_gateway"),
    },
    "tag_not_a_string": {"type": ["response.created"], "sequence_number": 1},
}
EVENT_EXTRAS = {
    "extra_field": {**EVENTS["args_delta"], "obfuscation": "Zq9", "x_gateway": {"hop": 2}},
}


def fast_build(cast_to: Any, data: dict[str, Any]) -> Any:
    client = openai.AsyncOpenAI(api_key="k", base_url="http://x.invalid/v1")
    specialize(client, fast=True, budget=False)
    return client._process_response_data(data=copy.deepcopy(data), cast_to=cast_to, response=None)  # type: ignore[arg-type]


def sdk_build(cast_to: Any, data: dict[str, Any]) -> Any:
    return construct_type(type_=cast_to, value=copy.deepcopy(data))


def assert_same(fast: Any, sdk: Any) -> None:
    assert type(fast) is type(sdk)
    assert repr(fast) == repr(sdk)  # the classes of nested objects, ints against floats
    assert fast.model_dump() == sdk.model_dump()
    assert fast.model_dump(exclude_unset=True) == sdk.model_dump(exclude_unset=True)
    assert fast.to_dict() == sdk.to_dict()
    assert fast.to_json() == sdk.to_json()
    assert declared_fields_set(fast) == declared_fields_set(sdk)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic warns when dumping the SDK's unvalidated objects
@pytest.mark.parametrize("name", sorted({**RESPONSES, **RESPONSE_FALLBACKS, **RESPONSE_EXTRAS}))
def test_response_shapes_build_like_the_sdk(name: str) -> None:
    data = {**RESPONSES, **RESPONSE_FALLBACKS, **RESPONSE_EXTRAS}[name]
    assert_same(fast_build(Response, data), sdk_build(Response, data))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted({**EVENTS, **EVENT_FALLBACKS, **EVENT_EXTRAS}))
def test_stream_event_shapes_build_like_the_sdk(name: str) -> None:
    data = {**EVENTS, **EVENT_FALLBACKS, **EVENT_EXTRAS}[name]
    assert_same(fast_build(ResponseStreamEvent, data), sdk_build(ResponseStreamEvent, data))


@pytest.mark.parametrize("name", sorted({**RESPONSES, **RESPONSE_EXTRAS}))
def test_common_responses_are_built_by_validation(name: str) -> None:
    data = {**RESPONSES, **RESPONSE_EXTRAS}[name]
    assert isinstance(validate_response(copy.deepcopy(data), Response), Response)


@pytest.mark.parametrize("name", sorted({**EVENTS, **EVENT_EXTRAS}))
def test_common_stream_events_are_built_by_validation(name: str) -> None:
    data = {**EVENTS, **EVENT_EXTRAS}[name]
    built = validate_response(copy.deepcopy(data), ResponseStreamEvent)
    assert built is not None
    assert built.type == data["type"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("cast_to", "data"),
    [
        *((Response, d) for d in RESPONSE_FALLBACKS.values()),
        *((ResponseStreamEvent, d) for d in EVENT_FALLBACKS.values()),
    ],
)
def test_what_strict_validation_refuses_is_left_to_the_sdk(cast_to: Any, data: dict[str, Any]) -> None:
    assert validate_response(copy.deepcopy(data), cast_to) is None


def test_a_discriminator_value_two_classes_claim_is_left_to_the_sdk() -> None:
    class A(pydantic.BaseModel):
        type: Literal["a", "shared"]

    class B(pydantic.BaseModel):
        type: Literal["b", "shared"]

    union = Annotated[Union[A, B], PropertyInfo(discriminator="type")]  # noqa: UP007  # the SDK's spelling
    assert variants_by_tag(union) == {"a": A, "b": B}


# -- end to end, against the simulator (in process and over loopback HTTP) -----------------------


def structure(obj: Any) -> tuple[str, Any, frozenset[str]]:
    return repr(obj), obj.to_dict(), declared_fields_set(obj)


async def test_non_streamed_chat_is_the_bare_sdks(upstream: openai.AsyncOpenAI) -> None:
    client = moa_stream.wrap(upstream, fast=True)
    for model in ("sim-small", "sim-reasoner"):
        bare = await upstream.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
        fast = await client.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
        assert structure(fast) == structure(bare)
        assert fast._request_id is not None
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=USER)  # type: ignore[arg-type]
        parsed = raw.parse()
        assert structure(parsed) == structure(bare)
        assert parsed._request_id == raw.headers["x-request-id"]
    await client.close()


async def test_non_streamed_responses_are_the_bare_sdks(upstream: openai.AsyncOpenAI) -> None:
    client = moa_stream.wrap(upstream, fast=True)
    for model in ("sim-small", "sim-reasoner"):
        bare = await upstream.responses.create(model=model, input="Tell me about streams")
        fast = await client.responses.create(model=model, input="Tell me about streams")
        assert structure(fast) == structure(bare)
        assert fast._request_id is not None
        assert fast.output_text == bare.output_text != ""
        raw = await client.responses.with_raw_response.create(model=model, input="Tell me about streams")
        parsed = raw.parse()
        assert structure(parsed) == structure(bare)
        assert parsed._request_id == raw.headers["x-request-id"]
        async with client.responses.with_streaming_response.create(model=model, input="Tell me about streams") as r:
            streamed = await r.parse()
            assert structure(streamed) == structure(bare)
            assert streamed._request_id == r.headers["x-request-id"]
    await client.close()


async def streamed_events(client: openai.AsyncOpenAI, model: str) -> list[tuple[str, Any, frozenset[str]]]:
    stream = await client.responses.create(model=model, input="Tell me about streams", stream=True)
    return [(repr(e), e.to_dict(), declared_fields_set(e)) async for e in stream]


async def test_streamed_responses_events_are_the_bare_sdks(upstream: openai.AsyncOpenAI) -> None:
    client = moa_stream.wrap(upstream, fast=True)
    for model in ("sim-small", "sim-reasoner"):
        bare = await streamed_events(upstream, model)
        assert len(bare) > 5
        assert await streamed_events(client, model) == bare
    await client.close()


async def stream_helper(client: openai.AsyncOpenAI) -> tuple[list[Any], Any]:
    async with client.responses.stream(model="sim-small", input="Tell me about streams") as stream:
        events = [e.to_dict() async for e in stream]
        final = await stream.get_final_response()
    return events, final.to_dict()


async def test_the_responses_stream_helper_gives_the_bare_sdks_events(upstream: openai.AsyncOpenAI) -> None:
    client = moa_stream.wrap(upstream, fast=True)
    assert await stream_helper(client) == await stream_helper(upstream)
    await client.close()


# -- end to end, against provider-shaped bytes ---------------------------------------------------


class City(pydantic.BaseModel):
    city: str
    celsius: float


CITY = '{"city":"Oslo","celsius":4.5}'
JSON = [("content-type", "application/json"), ("x-request-id", "req_scripted")]


def chat_completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4.1",
        "system_fingerprint": "fp_1",
        "service_tier": "default",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
    }


def reply(request: Request) -> Reply:
    body = request.json()
    model = body["model"]
    if request.path.endswith("/chat/completions"):
        return Reply(headers=JSON, parts=[json.dumps(chat_completion(CITY)).encode()])
    if body.get("stream"):
        events = openai_response_events(WORDS)
        if model == "fallbacks":  # a gateway's own event and field, and a status of its own at the end
            events.insert(3, {"type": "response.gateway.heartbeat", "sequence_number": 3})
            events[4] = {**events[4], "x_gateway": {"hop": 2}}
            events[-1]["response"]["status"] = "queued_by_gateway"
        return Reply(headers=SSE, parts=event_stream(events))
    document = response(output=[message(CITY)])
    if model == "fallbacks":
        document = response(status="queued_by_gateway", provider="OpenRouter")
    return Reply(headers=JSON, parts=[json.dumps(document).encode()])


@pytest.fixture
def provider() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream(reply) as upstream:
        yield upstream


def bare_and_fast(provider: ScriptedUpstream) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    bare = openai.AsyncOpenAI(base_url=provider.base_url, api_key="sk-test", max_retries=0)
    return bare, moa_stream.wrap(bare, fast=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
async def test_structured_outputs_parse_as_with_the_bare_sdk(provider: ScriptedUpstream) -> None:
    bare, fast = bare_and_fast(provider)
    chat = [
        await c.chat.completions.parse(model="gpt-4.1", messages=USER, response_format=City)  # type: ignore[arg-type]
        for c in (bare, fast)
    ]
    assert chat[1].choices[0].message.parsed == City(city="Oslo", celsius=4.5)
    assert structure(chat[1]) == structure(chat[0])
    responses = [await c.responses.parse(model="gpt-4.1", input="Weather?", text_format=City) for c in (bare, fast)]
    assert responses[1].output_parsed == City(city="Oslo", celsius=4.5)
    assert structure(responses[1]) == structure(responses[0])
    await fast.close()


@pytest.mark.filterwarnings("ignore::UserWarning")
async def test_provider_bytes_strict_validation_refuses_are_built_as_the_bare_sdk_builds_them(
    provider: ScriptedUpstream,
) -> None:
    bare, fast = bare_and_fast(provider)
    whole = [await c.responses.create(model="fallbacks", input="Hi") for c in (bare, fast)]
    assert whole[1].status == "queued_by_gateway"
    assert repr(whole[1]) == repr(whole[0])
    assert whole[1].to_dict() == whole[0].to_dict()
    for model in ("openai", "fallbacks"):
        assert await streamed_events(fast, model) == await streamed_events(bare, model)
    await fast.close()


async def test_the_simulators_responses_and_events_take_the_validated_path(upstream: openai.AsyncOpenAI) -> None:
    # Equal objects alone would also come from the fallback: the point is that they need not.
    raw = await upstream.responses.with_raw_response.create(model="sim-reasoner", input="Tell me about streams")
    assert isinstance(validate_response(json.loads(raw.http_response.content), Response), Response)
    async with upstream.responses.with_streaming_response.create(
        model="sim-reasoner", input="Tell me about streams", stream=True
    ) as streamed:
        body = b"".join([part async for part in streamed.iter_bytes()])
    datas = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert len(datas) > 5
    assert all(validate_response(json.loads(data), ResponseStreamEvent) is not None for data in datas)
