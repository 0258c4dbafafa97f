"""The simulator, spoken to by the real openai SDK: in-process (SimTransport) and over loopback
(SimServer). Every model here is zero-latency unless a test is about latency."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import anyio
import openai
import pytest
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk, ChatCompletionFunctionToolParam, ChatCompletionMessageParam

from moa_stream._sdk import default_http_module
from moa_stream.testing import (
    Fault,
    SimModel,
    SimResponse,
    SimServer,
    SimTransport,
    Simulator,
    sim_client,
    sim_token_count,
)

from .conftest import DROPPED_MID_STREAM, TIMED_OUT_MID_STREAM

Transport = Literal["inproc", "loopback"]
BOTH = pytest.mark.parametrize("transport", ["inproc", "loopback"])
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers please"},
]
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,  # openai 2.x's .stream() parses only strict tools
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
            },
        },
    },
}
TIME_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "strict": True,
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}


@contextlib.asynccontextmanager
async def open_client(
    sim: Simulator, transport: Transport = "inproc", **kwargs: Any
) -> AsyncIterator[openai.AsyncOpenAI]:
    if transport == "inproc":
        async with sim_client(sim, **kwargs) as client:
            yield client
    else:
        async with (
            SimServer(sim) as server,
            openai.AsyncOpenAI(base_url=server.base_url, api_key="sim-key", **kwargs) as client,
        ):
            yield client


async def open_stream(client: openai.AsyncOpenAI, **kwargs: Any) -> AsyncStream[ChatCompletionChunk]:
    kwargs.setdefault("messages", MESSAGES)
    stream = await client.chat.completions.create(model="m", stream=True, **kwargs)
    return cast("AsyncStream[ChatCompletionChunk]", stream)


async def stream_text(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[str, list[ChatCompletionChunk]]:
    stream = await open_stream(client, **kwargs)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def collect(stream: AsyncIterator[Any], into: list[Any]) -> None:
    async for chunk in stream:
        into.append(chunk)


async def read_body(response: SimResponse) -> bytes:
    return b"".join([part async for part in response.body])


def chat_body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **fields}).encode()


def prompt_tokens(messages: list[Any]) -> int:
    texts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part["text"] for part in content if part.get("type") == "text"]
        texts += [call["function"]["arguments"] for call in m.get("tool_calls", [])]
    return 3 * len(messages) + sum(map(sim_token_count, texts)) + 3


# -- text, determinism, usage -------------------------------------------------------------


def test_sim_token_count_counts_whitespace_separated_words() -> None:
    assert sim_token_count("  one two\tthree\nfour ") == 4
    assert sim_token_count("") == 0


@BOTH
async def test_streamed_text_equals_non_streamed_text(transport: Transport) -> None:
    sim = Simulator([SimModel(name="m")])
    async with open_client(sim, transport) as client:
        whole = await client.chat.completions.create(model="m", messages=MESSAGES)
        streamed, _ = await stream_text(client)
    assert streamed == whole.choices[0].message.content
    assert sim_token_count(streamed) == 24


async def test_same_request_gives_identical_bytes() -> None:
    body = chat_body(stream=True, seed=7, stream_options={"include_usage": True})
    first = await Simulator().handle("POST", "/v1/chat/completions", {}, body)
    second = await Simulator().handle("POST", "/v1/chat/completions", {}, body)
    assert await read_body(first) == await read_body(second)


async def test_different_seed_gives_different_text() -> None:
    async with open_client(Simulator()) as client:
        one, _ = await stream_text(client, seed=1)
        two, _ = await stream_text(client, seed=2)
    assert one != two


async def test_usage_chunk_is_sent_only_when_include_usage_is_true() -> None:
    async with open_client(Simulator()) as client:
        _, without = await stream_text(client)
        _, declined = await stream_text(client, stream_options={"include_usage": False})
        _, asked = await stream_text(client, stream_options={"include_usage": True})
    assert all(c.usage is None for c in without + declined)
    assert [c.usage is not None for c in asked].count(True) == 1
    assert asked[-1].choices == []
    assert asked[-1].usage is not None


async def test_usage_counts_match_sim_token_count() -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": [{"type": "text", "text": "weather in two cities"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny and mild"},
    ]
    async with open_client(Simulator([SimModel(name="m", reply_tokens=9)])) as client:
        text, chunks = await stream_text(client, messages=messages, stream_options={"include_usage": True})
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens(messages) == 3 * 3 + 4 + 2 + 3 + 3
    assert usage.completion_tokens == sim_token_count(text) == 9
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_reasoning_tokens_stream_before_content_and_count_in_usage() -> None:
    sim = Simulator([SimModel(name="m", reply_tokens=5, reasoning_tokens=4)])
    async with open_client(sim) as client:
        _, chunks = await stream_text(client, stream_options={"include_usage": True})
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == ["reasoning_content"] * 4 + ["content"] * 5
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == sim_token_count(reasoning) == 4
    assert usage.completion_tokens == 9


async def test_max_tokens_cuts_the_reply_with_finish_reason_length() -> None:
    async with open_client(Simulator()) as client:
        cut = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
        full = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=500)
    assert cut.choices[0].finish_reason == "length"
    assert full.choices[0].finish_reason == "stop"
    assert sim_token_count(cut.choices[0].message.content or "") == 5
    assert (full.choices[0].message.content or "").startswith(cut.choices[0].message.content or "")


async def test_ttft_delays_the_first_chunk() -> None:
    async with open_client(Simulator([SimModel(name="m", ttft_s=0.05)])) as client:
        start = anyio.current_time()
        stream = await open_stream(client)
        await stream.__anext__()
        elapsed = anyio.current_time() - start
        await stream.close()
    assert elapsed >= 0.05


async def test_unknown_model_uses_the_default_model() -> None:
    sim = Simulator(default=SimModel(name="fallback", reply_tokens=3))
    async with open_client(sim) as client:
        reply = await client.chat.completions.create(model="anything", messages=MESSAGES)
    assert sim_token_count(reply.choices[0].message.content or "") == 3
    assert reply.model == "anything"
    assert sim.stats.requests_by_model == {"anything": 1}


async def test_requests_seen_records_what_went_upstream() -> None:
    sim = Simulator()
    async with open_client(sim) as client:
        await stream_text(client, stream_options={"include_usage": True})
    assert sim.requests_seen[0]["stream_options"] == {"include_usage": True}
    assert sim.requests_seen[0]["messages"] == MESSAGES


# -- tool calls -------------------------------------------------------------------------------


async def test_tool_call_stream_assembles_to_valid_json_arguments() -> None:
    async with (
        open_client(Simulator()) as client,
        client.chat.completions.stream(
            model="m",
            messages=MESSAGES,
            tools=[WEATHER_TOOL],
            stream_options={"include_usage": True},
        ) as stream,
    ):
        completion = await stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].type == "function"
    arguments = json.loads(calls[0].function.arguments)
    assert calls[0].function.name == "get_weather"
    assert isinstance(arguments["city"], str)
    assert isinstance(arguments["days"], int)
    assert arguments["metric"] is True
    assert completion.usage is not None
    assert completion.usage.completion_tokens == sim_token_count(calls[0].function.arguments)


async def test_tool_arguments_stream_in_two_to_four_fragments() -> None:
    async with open_client(Simulator()) as client:
        _, chunks = await stream_text(client, tools=[WEATHER_TOOL])
    fragments = [
        call.function.arguments
        for c in chunks
        if c.choices
        for call in c.choices[0].delta.tool_calls or []
        if call.function is not None and call.function.arguments
    ]
    assert 2 <= len(fragments) <= 4


async def test_named_tool_choice_calls_that_tool() -> None:
    async with open_client(Simulator()) as client:
        reply = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls if c.type == "function"] == ["get_time"]


async def test_tool_choice_none_replies_with_text() -> None:
    async with open_client(Simulator()) as client:
        reply = await client.chat.completions.create(
            model="m", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none"
        )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


async def test_reply_after_a_tool_result_begins_with_based_on_the_tool_result() -> None:
    messages: list[ChatCompletionMessageParam] = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    async with open_client(Simulator()) as client:
        reply = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert (reply.choices[0].message.content or "").startswith("Based on the tool result")


# -- faults ------------------------------------------------------------------------------------


def faulty(kind: Any, **options: Any) -> Simulator:
    return Simulator([SimModel(name="m", fault=Fault(kind=kind, **options))])


async def test_http_429_is_retried_by_the_sdk_then_raises_rate_limit_error() -> None:
    sim = faulty("http_429")
    async with open_client(sim, max_retries=2) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert sim.stats.requests == 3


async def test_http_429_without_retries_raises_rate_limit_error_at_once() -> None:
    sim = faulty("http_429")
    async with open_client(sim, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert sim.stats.requests == 1
    assert caught.value.response.headers["retry-after"] == "0"
    assert caught.value.code == "rate_limit_exceeded"


async def test_http_500_raises_internal_server_error() -> None:
    async with open_client(faulty("http_500"), max_retries=0) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=MESSAGES)


@BOTH
async def test_disconnect_raises_api_connection_error_from_remote_protocol_error(
    transport: Transport,
) -> None:
    sim = faulty("disconnect", after_chunks=3)
    received: list[Any] = []
    async with open_client(sim, transport, max_retries=0) as client:
        stream = await open_stream(client)
        with pytest.raises(DROPPED_MID_STREAM) as caught:
            await collect(stream, received)
    assert len(received) == 3
    # openai 3.x wraps the transport error; 2.x raises it as it is
    dropped = caught.value.__cause__ if isinstance(caught.value, openai.APIConnectionError) else caught.value
    assert isinstance(dropped, default_http_module().RemoteProtocolError)
    assert sim.stats.open_streams == 0


@BOTH
async def test_disconnect_on_a_non_streamed_request_raises_api_connection_error(transport: Transport) -> None:
    sim = faulty("disconnect")
    async with open_client(sim, transport, max_retries=0) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert sim.stats.open_streams == 0


async def test_malformed_non_streamed_body_raises_json_decode_error() -> None:
    async with open_client(faulty("malformed")) as client:
        with pytest.raises(json.JSONDecodeError):
            await client.chat.completions.create(model="m", messages=MESSAGES)


async def test_stall_on_a_non_streamed_request_delays_the_whole_reply() -> None:
    async with open_client(faulty("stall"), max_retries=0, timeout=0.05) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=MESSAGES)


async def test_malformed_event_raises_json_decode_error() -> None:
    async with open_client(faulty("malformed", after_chunks=2)) as client:
        with pytest.raises(json.JSONDecodeError):
            await stream_text(client)


async def test_stream_error_event_raises_api_error() -> None:
    async with open_client(faulty("stream_error", after_chunks=2)) as client:
        with pytest.raises(openai.APIError, match="simulated in-stream error"):
            await stream_text(client)


async def test_reject_stream_options_raises_bad_request_error() -> None:
    async with open_client(faulty("reject_stream_options")) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await stream_text(client, stream_options={"include_usage": True})
    assert caught.value.param == "stream_options"
    assert "Unrecognized request argument supplied: stream_options" in caught.value.message


async def test_reject_stream_options_serves_requests_without_stream_options() -> None:
    async with open_client(faulty("reject_stream_options")) as client:
        text, _ = await stream_text(client)
    assert sim_token_count(text) == 24


async def test_no_usage_fault_omits_usage_even_when_asked() -> None:
    async with open_client(faulty("no_usage")) as client:
        _, chunks = await stream_text(client, stream_options={"include_usage": True})
        whole = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert all(c.usage is None for c in chunks)
    assert whole.usage is None


@BOTH
async def test_stall_past_the_read_timeout_raises_api_timeout_error_and_closes_the_body(transport: Transport) -> None:
    sim = faulty("stall", after_chunks=2)
    async with open_client(sim, transport, max_retries=0, timeout=0.2) as client:
        with pytest.raises(TIMED_OUT_MID_STREAM):
            await stream_text(client)
        with anyio.fail_after(5):
            await sim.wait_idle()
    assert sim.stats.open_streams == 0


async def test_non_streamed_reply_slower_than_the_read_timeout_raises_api_timeout_error() -> None:
    sim = Simulator([SimModel(name="m", ttft_s=30.0)])
    async with open_client(sim, max_retries=0, timeout=0.05) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=MESSAGES)


async def test_fault_header_injects_a_fault_into_one_request() -> None:
    async with open_client(Simulator()) as client:
        with pytest.raises(openai.APIError, match="simulated in-stream error"):
            await stream_text(client, extra_headers={"x-sim-fault": "stream_error;after=1"})
        text, _ = await stream_text(client)
    assert sim_token_count(text) == 24


async def test_fault_header_none_switches_off_the_model_fault() -> None:
    async with open_client(faulty("http_500"), max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-sim-fault": "none"}
        )
    assert reply.choices[0].finish_reason == "stop"


# -- cleanup -------------------------------------------------------------------------------


@BOTH
async def test_open_streams_returns_to_zero_after_break_and_close(transport: Transport) -> None:
    # The stall keeps the server mid-body, so only closing can end the stream.
    sim = faulty("stall", after_chunks=3)
    async with open_client(sim, transport) as client:
        stream = await open_stream(client)
        async for _ in stream:
            assert sim.stats.open_streams == 1
            break
        await stream.close()
        with anyio.fail_after(5):
            await sim.wait_idle()
    assert sim.stats.open_streams == 0


async def test_closing_the_in_process_stream_closes_the_body_at_once() -> None:
    sim = faulty("stall", after_chunks=3)
    async with open_client(sim) as client:
        stream = await open_stream(client)
        await stream.__anext__()
        await stream.close()
        assert sim.stats.open_streams == 0


async def test_server_aclose_is_idempotent_and_the_server_cannot_reopen() -> None:
    server = SimServer(Simulator())
    async with server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        await server.aclose()
    await server.aclose()
    with pytest.raises(RuntimeError):
        await server.__aenter__()


# -- routes ----------------------------------------------------------------------------------


@BOTH
async def test_models_endpoint_lists_the_named_models(transport: Transport) -> None:
    sim = Simulator([SimModel(name="alpha"), SimModel(name="beta")])
    async with open_client(sim, transport) as client:
        page = await client.models.list()
    assert [m.id for m in page.data] == ["alpha", "beta"]


async def test_unknown_route_is_404_in_openai_error_shape() -> None:
    response = await Simulator().handle("GET", "/v1/nothing", {}, b"")
    assert response.status == 404
    error = json.loads(await read_body(response))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "/v1/nothing" in error["message"]


async def test_malformed_request_body_is_400_naming_the_problem() -> None:
    response = await Simulator().handle("POST", "/v1/chat/completions", {}, b"{not json")
    assert response.status == 400
    error = json.loads(await read_body(response))["error"]
    assert "JSON" in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_missing_messages_is_400_naming_the_param() -> None:
    body = json.dumps({"model": "m"}).encode()
    response = await Simulator().handle("POST", "/v1/chat/completions", {}, body)
    assert response.status == 400
    assert json.loads(await read_body(response))["error"]["param"] == "messages"


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "param", "says"),
    [
        ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "x"}], 1, "'tool'"),
        (
            [
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "system", "content": "later rules"},
                {"role": "tool", "tool_call_id": "call_1", "content": "x"},
            ],
            0,
            "call_1",
        ),
    ],
    ids=["tool-without-call", "call-without-output"],
)
async def test_tool_messages_out_of_place_are_400_as_openai_says(
    messages: list[dict[str, object]], param: int, says: str
) -> None:
    body = json.dumps({"model": "m", "messages": messages}).encode()
    response = await Simulator().handle("POST", "/v1/chat/completions", {}, body)
    assert response.status == 400
    error = json.loads(await read_body(response))["error"]
    assert error["param"] == f"messages.[{param}].role"
    assert says in error["message"]


async def test_tool_messages_answering_their_calls_are_accepted() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "x"},
        {"role": "tool", "tool_call_id": "call_1", "content": "y"},
        {"role": "user", "content": "thanks"},
    ]
    body = json.dumps({"model": "m", "messages": messages}).encode()
    assert (await Simulator().handle("POST", "/v1/chat/completions", {}, body)).status == 200


async def test_every_response_carries_a_request_id() -> None:
    sim = Simulator()
    responses = [
        await sim.handle("POST", "/v1/chat/completions", {}, chat_body()),
        await sim.handle("POST", "/v1/chat/completions", {}, chat_body(stream=True)),
        await sim.handle("GET", "/v1/models", {}, b""),
        await sim.handle("GET", "/v1/nothing", {}, b""),
    ]
    ids = [dict(r.headers)["x-request-id"] for r in responses]
    assert ids == ["sim-req-1", "sim-req-2", "sim-req-3", "sim-req-4"]


def test_sim_transport_derives_from_the_client_modules_base_transport() -> None:
    transport = SimTransport(Simulator())
    assert isinstance(transport, SimTransport)
    assert isinstance(transport, default_http_module().AsyncBaseTransport)


def test_invalid_model_config_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValueError, match="ttft_s"):
        SimModel(name="m", ttft_s=-1.0)
    with pytest.raises(ValueError, match="kind"):
        Fault(kind="explode")  # type: ignore[arg-type]
