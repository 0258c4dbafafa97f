"""Every way the openai SDK can send a chat completion crosses the metering transport."""

from __future__ import annotations

import openai
from openai import AsyncStream
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import moa_stream
from moa_stream._sdk import find_engine
from moa_stream.testing import sim_token_count

from .conftest import EventLog, first_stream

USER = [{"role": "user", "content": "Tell me about streams"}]


def only_call(log: EventLog) -> moa_stream.CallUsage:
    calls = log.of(moa_stream.CallUsage)
    assert len(calls) == 1, calls
    return calls[0]


async def test_create_streamed_is_metered_with_reported_usage(client: openai.AsyncOpenAI, log: EventLog) -> None:
    await first_stream(client, log)
    stream = await client.chat.completions.create(model="sim-small", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await log.wait_turns(1)
    call = only_call(log)
    assert call.status == "completed"
    assert call.usage_source == "reported"
    assert call.output_tokens == sim_token_count(text)
    assert log.of(moa_stream.TurnTrace)[0].calls[0].output.text == text


async def test_create_non_streamed_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    completion = await client.chat.completions.create(model="sim-small", messages=USER)
    assert isinstance(completion, ChatCompletion)
    await log.wait_turns(1)
    call = only_call(log)
    assert (call.status, call.usage_source) == ("completed", "reported")
    assert completion.usage is not None
    assert call.output_tokens == completion.usage.completion_tokens
    record = log.of(moa_stream.TurnTrace)[0].calls[0]
    assert record.output_source == "inline"
    assert record.output.text == completion.choices[0].message.content


async def test_with_raw_response_create_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="sim-small", messages=USER)
    completion = raw.parse()
    await log.wait_turns(1)
    assert only_call(log).output_tokens == completion.usage.completion_tokens  # type: ignore[union-attr]


async def test_with_streaming_response_create_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    async with client.chat.completions.with_streaming_response.create(
        model="sim-small", messages=USER, stream=True
    ) as response:
        stream = await response.parse()
        chunks = [chunk async for chunk in stream]
    await log.wait_turns(1)
    assert only_call(log).status == "completed"
    assert all(chunk.choices for chunk in chunks)  # the usage chunk we asked for is not shown


async def test_stream_helper_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    async with client.chat.completions.stream(model="sim-small", messages=USER) as stream:
        final = await stream.get_final_completion()
    await log.wait_turns(1)
    record = log.of(moa_stream.TurnTrace)[0].calls[0]
    assert record.output.text == final.choices[0].message.content
    assert record.usage.status == "completed"


async def test_with_options_copy_keeps_metering(client: openai.AsyncOpenAI, log: EventLog) -> None:
    copy = client.with_options(max_retries=0, timeout=30)
    assert isinstance(copy, openai.AsyncOpenAI)
    await copy.chat.completions.create(model="sim-small", messages=USER)
    await client.copy().chat.completions.create(model="sim-small", messages=USER)
    await log.wait_turns(2)
    assert len(log.of(moa_stream.CallUsage)) == 2


async def test_direct_post_as_litellm_does_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.post(
        "/chat/completions",
        body={"model": "sim-small", "messages": USER, "stream": True},
        cast_to=ChatCompletionChunk,
        stream=True,
        stream_cls=AsyncStream[ChatCompletionChunk],
    )
    async for _ in stream:
        pass
    await log.wait_turns(1)
    assert only_call(log).status == "completed"


async def test_other_endpoints_pass_through_unmetered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    models = await client.models.list()
    assert "sim-small" in [m.id for m in models.data]
    await client.chat.completions.create(model="sim-small", messages=USER)
    await log.wait_turns(1)
    assert len(log.of(moa_stream.CallUsage)) == 1  # only the chat call


async def test_wrapped_client_is_the_same_class_with_the_same_options(upstream: openai.AsyncOpenAI) -> None:
    wrapped = moa_stream.wrap(upstream)
    try:
        assert type(wrapped) is type(upstream)
        assert wrapped.base_url == upstream.base_url
        assert wrapped.api_key == upstream.api_key
        assert wrapped.max_retries == upstream.max_retries
        assert type(wrapped._client) is type(upstream._client)
        assert find_engine(wrapped.with_options(timeout=5)) is find_engine(wrapped)
    finally:
        await wrapped.close()


async def test_original_client_is_not_metered(upstream: openai.AsyncOpenAI, log: EventLog) -> None:
    wrapped = moa_stream.wrap(upstream, sinks=[log])
    await upstream.chat.completions.create(model="sim-small", messages=USER)
    await wrapped.chat.completions.create(model="sim-small", messages=USER)
    await moa_stream.flush(wrapped)
    assert len(log.of(moa_stream.CallUsage)) == 1
    await wrapped.close()
