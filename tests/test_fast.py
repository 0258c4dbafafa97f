"""Fast mode builds the same objects as the SDK: equal model_dump() for every provider's shapes."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai._streaming import SSEDecoder
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import moa_stream
from moa_stream._fast import FastSSEDecoder
from moa_stream._sdk import specialize

USER = [{"role": "user", "content": "Tell me about streams"}]


def chunk(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4.1-mini",
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}],
    }
    base.update(fields)
    return base


def completion(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4.1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    base.update(fields)
    return base


USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "total_tokens": 15,
    "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0},
}
TOOL_DELTA = {
    "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}]
}

CHUNKS = {
    "openai": chunk(system_fingerprint="fp_1", service_tier="default", usage=None),
    "openai_usage": chunk(choices=[], usage=USAGE),
    "openai_tool_delta": chunk(choices=[{"index": 0, "delta": TOOL_DELTA, "finish_reason": None}]),
    "azure_prompt_filter_empty_choices": chunk(
        choices=[],
        model="",
        prompt_filter_results=[{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False}}}],
    ),
    "azure_content_filter": chunk(
        choices=[
            {
                "index": 0,
                "delta": {"content": "x"},
                "finish_reason": None,
                "content_filter_results": {"violence": {"filtered": False, "severity": "safe"}},
            }
        ]
    ),
    "vllm_reasoning_and_stop_reason": chunk(
        choices=[{"index": 0, "delta": {"reasoning_content": "think"}, "finish_reason": None, "stop_reason": None}]
    ),
    "llamacpp_timings": chunk(
        choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], timings={"predicted_ms": 12.5}
    ),
    "ollama": chunk(system_fingerprint="fp_ollama"),
    "together_extra_token": chunk(
        choices=[{"index": 0, "delta": {"content": "x"}, "text": "x", "finish_reason": None, "seed": None}]
    ),
    "openrouter_usage_with_choices": chunk(
        provider="OpenAI",
        usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": 0.0001},
        choices=[{"index": 0, "delta": {"content": ""}, "finish_reason": "stop", "native_finish_reason": "stop"}],
    ),
    "groq_x_groq_and_own_tier": chunk(x_groq={"id": "req_1", "usage": {"queue_time": 0.01}}, service_tier="on_demand"),
    "provider_finish_reason_not_in_the_enum": chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "eos"}]),
    "created_as_a_string": chunk(created="1700000000"),
    "created_as_a_float": chunk(created=1700000000.5),
    "missing_id_and_model": {"object": "chat.completion.chunk", "created": 1, "choices": []},
}
COMPLETIONS = {
    "openai": completion(system_fingerprint="fp_1", service_tier="default"),
    "openai_tool_call": completion(
        choices=[
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                "finish_reason": "tool_calls",
            }
        ]
    ),
    "azure_filters": completion(prompt_filter_results=[{"prompt_index": 0, "content_filter_results": {}}]),
    "vllm_reasoning": completion(
        choices=[
            {
                "index": 0,
                "message": {"role": "assistant", "content": "a", "reasoning_content": "b"},
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ]
    ),
    "llamacpp_no_usage": {**completion(), "usage": None, "timings": {"prompt_n": 3}},
    "groq": completion(x_groq={"id": "x"}, usage={**USAGE, "queue_time": 0.1}),
}


def fast_build(cast_to: Any, data: dict[str, Any]) -> Any:
    client = openai.AsyncOpenAI(api_key="k", base_url="http://x.invalid/v1")
    specialize(client, fast=True, budget=False)
    return client._process_response_data(data=copy.deepcopy(data), cast_to=cast_to, response=None)  # type: ignore[arg-type]


def sdk_build(cast_to: Any, data: dict[str, Any]) -> Any:
    return construct_type(type_=cast_to, value=copy.deepcopy(data))


def assert_same(cast_to: Any, data: dict[str, Any]) -> None:
    fast, sdk = fast_build(cast_to, data), sdk_build(cast_to, data)
    assert type(fast) is type(sdk) is cast_to
    assert fast.model_dump() == sdk.model_dump()
    assert fast.model_dump(exclude_unset=True) == sdk.model_dump(exclude_unset=True)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic warns when dumping the SDK's unvalidated objects
@pytest.mark.parametrize("name", sorted(CHUNKS))
def test_chunk_shapes_dump_like_the_sdk(name: str) -> None:
    assert_same(ChatCompletionChunk, CHUNKS[name])


@pytest.mark.parametrize("name", sorted(COMPLETIONS))
def test_completion_shapes_dump_like_the_sdk(name: str) -> None:
    assert_same(ChatCompletion, COMPLETIONS[name])


def test_validated_path_is_taken_for_the_common_shape() -> None:
    # The point of fast mode: a plain OpenAI chunk is built by validation, not by the fallback.
    built = ChatCompletionChunk.model_validate(CHUNKS["openai"], strict=True)
    assert built.model_dump() == fast_build(ChatCompletionChunk, CHUNKS["openai"]).model_dump()


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
field_values = {
    "id": st.one_of(st.text(max_size=10), json_values),
    "created": st.one_of(st.integers(0, 2**33), st.floats(allow_nan=False), st.text(max_size=5)),
    "model": st.one_of(st.text(max_size=10), st.none()),
    "service_tier": st.one_of(st.sampled_from(["auto", "default", "flex", "on_demand"]), st.none()),
    "system_fingerprint": st.one_of(st.text(max_size=10), st.none(), st.integers()),
    "usage": st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)},
            optional={"total_tokens": st.integers(0, 10**6), "cost": json_values},
        ),
    ),
}
deltas = st.fixed_dictionaries(
    {},
    optional={
        "content": st.one_of(st.text(max_size=10), st.none()),
        "role": st.sampled_from(["assistant", "user", "tool", "developer", "narrator"]),
        "refusal": st.one_of(st.text(max_size=5), st.none()),
        "reasoning_content": st.text(max_size=5),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {"index": st.integers(0, 3)},
                optional={
                    "id": st.text(max_size=5),
                    "type": st.sampled_from(["function", "custom"]),
                    "function": st.fixed_dictionaries(
                        {}, optional={"name": st.text(max_size=5), "arguments": st.text(max_size=5)}
                    ),
                },
            ),
            max_size=2,
        ),
    },
)
choices = st.lists(
    st.fixed_dictionaries(
        {"index": st.integers(0, 3), "delta": deltas},
        optional={
            "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls", "eos"])),
            "logprobs": st.none(),
            "extra_vendor_field": json_values,
        },
    ),
    max_size=2,
)
chunk_variants = st.builds(
    lambda base, extra, chosen: {**base, **chosen, **extra},
    st.just(chunk()),
    st.dictionaries(st.sampled_from(["x_groq", "provider", "timings", "obfuscation"]), json_values, max_size=2),
    st.fixed_dictionaries({"choices": choices}, optional=field_values),
)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic warns when dumping the SDK's unvalidated objects
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk_variants)
def test_generated_chunk_variants_dump_like_the_sdk(data: dict[str, Any]) -> None:
    assert_same(ChatCompletionChunk, data)


# -- the event-stream decoder --------------------------------------------------------------------

lines = st.one_of(
    st.builds(
        lambda v: f"data: {v}",
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12),
    ),
    st.builds(lambda v: f"data:{v}", st.text(alphabet="ab {}", max_size=5)),
    st.builds(lambda v: f"event: {v}", st.sampled_from(["", "message", "error", "thread.run"])),
    st.builds(lambda v: f"id: {v}", st.sampled_from(["", "1", "a\x00b", "7"])),
    st.builds(lambda v: f"retry: {v}", st.sampled_from(["10", "x", "-5", " 3"])),
    st.sampled_from([": comment", "unknown: field", "data", ""]),
)


async def _chunks(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)):
        yield data[start:cut]
        start = cut
    yield data[start:]


async def decode(decoder: Any, data: bytes, cuts: list[int]) -> list[tuple[Any, ...]]:
    return [(e.event, e.data, e.id, e.retry) async for e in decoder.aiter_bytes(_chunks(data, cuts))]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(lines, max_size=12),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.lists(st.integers(0, 400), max_size=6),
)
async def test_event_stream_decoder_matches_the_sdks(body: list[str], newline: str, cuts: list[int]) -> None:
    data = "".join(line + newline for line in body).encode()
    assert await decode(FastSSEDecoder(), data, cuts) == await decode(SSEDecoder(), data, cuts)


# -- end to end ----------------------------------------------------------------------------------


async def test_fast_client_streams_what_the_bare_sdk_streams(upstream: openai.AsyncOpenAI) -> None:
    client = moa_stream.wrap(upstream, fast=True)
    assert isinstance(client, type(upstream))
    assert type(client.with_options(timeout=5)) is type(client)  # copies stay fast
    for model in ("sim-small", "sim-reasoner"):
        bare = [
            c.model_dump()
            async for c in await upstream.chat.completions.create(model=model, messages=USER, stream=True)
        ]  # type: ignore[arg-type]
        fast = [
            c.model_dump() async for c in await client.chat.completions.create(model=model, messages=USER, stream=True)
        ]  # type: ignore[arg-type]
        assert fast == bare
    whole = await client.chat.completions.create(model="sim-small", messages=USER)  # type: ignore[arg-type]
    assert whole.model_dump() == (await upstream.chat.completions.create(model="sim-small", messages=USER)).model_dump()  # type: ignore[arg-type]
    assert whole._request_id is not None
    await client.close()


async def test_fast_client_raises_what_the_bare_sdk_raises_on_malformed_data(upstream: openai.AsyncOpenAI) -> None:
    import json

    client = moa_stream.wrap(upstream, fast=True)
    headers = {"x-sim-fault": "malformed;after=2"}
    with pytest.raises(json.JSONDecodeError):
        async for _ in await client.chat.completions.create(
            model="sim-small",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            extra_headers=headers,
        ):
            pass
    with pytest.raises(openai.APIError, match="simulated in-stream error"):
        async for _ in await client.chat.completions.create(
            model="sim-small",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"x-sim-fault": "stream_error;after=2"},
        ):
            pass
    await client.close()
