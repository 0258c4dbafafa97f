"""The simulator's Responses API, spoken to by the real openai SDK (`client.responses`): in-process
(SimTransport) and over loopback HTTP (the `server` fixture). The reply is chat's deterministic plan;
what is checked here is OpenAI's wire shape, the kept responses and the faults."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import openai
import pytest
from openai.types.responses import FunctionToolParam, Response, ResponseInputParam

from moa_stream.testing import SimModel, SimResponse, Simulator, sim_client, sim_token_count

from .conftest import DROPPED_MID_STREAM, TIMED_OUT_MID_STREAM, ServerThread

INSTRUCTIONS = "You are terse."
QUESTION = "Name three rivers please"
WEATHER_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
MODELS = [
    SimModel(name="m"),
    SimModel(name="reasoner", reasoning_tokens=4, reply_tokens=6),
    SimModel(name="ttft", ttft_s=0.05),
    SimModel(name="slow", ttft_s=0.3, tokens_per_s=100.0),  # a background response of about half a second
    SimModel(name="parked", ttft_s=3600.0),  # a background response that does not finish during a test
]
TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture
def sim(request: pytest.FixtureRequest) -> Simulator:
    """Overrides conftest's: these tests' models; `indirect` parametrization passes `responses`."""
    return Simulator(MODELS, responses=getattr(request, "param", True))


def connect(server: ServerThread | None, sim: Simulator, **kwargs: Any) -> openai.AsyncOpenAI:
    kwargs.setdefault("max_retries", 0)
    if server is None:
        return sim_client(sim, **kwargs)
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="sim-key", **kwargs)


@pytest.fixture
async def api(server: ServerThread | None, sim: Simulator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with connect(server, sim) as client:
        yield client


async def events_of(client: openai.AsyncOpenAI, fault: str | None = None, **kwargs: Any) -> list[Any]:
    """Every event of a streamed create, as the SDK parses them."""
    kwargs.setdefault("model", "m")
    kwargs.setdefault("input", QUESTION)
    headers = {"x-sim-fault": fault} if fault else None
    stream = await client.responses.create(stream=True, extra_headers=headers, **kwargs)
    return [event async for event in stream]


async def events_until_error(client: openai.AsyncOpenAI, fault: str, into: list[Any]) -> None:
    stream = await client.responses.create(model="m", input=QUESTION, stream=True, extra_headers={"x-sim-fault": fault})
    async for event in stream:
        into.append(event)


def squeeze(types: list[str]) -> list[str]:
    """Event types with runs of one type written once, so a sequence reads independent of length."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def texts(events: list[Any], kind: str = "response.output_text.delta") -> str:
    return "".join(e.delta for e in events if e.type == kind)


async def read_body(response: SimResponse) -> bytes:
    return b"".join([part async for part in response.body])


# -- text, usage, order ----------------------------------------------------------------------


async def test_non_streamed_text_equals_the_streamed_deltas(api: openai.AsyncOpenAI) -> None:
    whole = await api.responses.create(model="m", input=QUESTION, instructions=INSTRUCTIONS)
    events = await events_of(api, instructions=INSTRUCTIONS)
    assert whole.status == "completed"
    assert whole.output_text == texts(events)
    assert sim_token_count(whole.output_text) == 24


async def test_usage_counts_match_sim_token_count(api: openai.AsyncOpenAI) -> None:
    reply = await api.responses.create(model="m", input=QUESTION, instructions=INSTRUCTIONS)
    usage = reply.usage
    assert usage is not None
    # Chat's accounting of the equivalent request: a system and a user message.
    assert usage.input_tokens == 3 * 2 + sim_token_count(INSTRUCTIONS) + sim_token_count(QUESTION) + 3 == 16
    assert usage.output_tokens == sim_token_count(reply.output_text) == 24
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_stream_helper_gives_the_final_response(api: openai.AsyncOpenAI) -> None:
    async with api.responses.stream(model="m", input=QUESTION) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == "".join(deltas)
    assert final.usage is not None
    assert final.usage.output_tokens == 24


async def test_event_sequence_numbers_count_up_from_zero_in_openais_order(api: openai.AsyncOpenAI) -> None:
    events = await events_of(api)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert squeeze(types) == ["response.created", "response.in_progress", *TEXT_EVENTS, "response.completed"]
    assert types.count("response.output_text.delta") == 24


async def test_lifecycle_snapshots_have_no_output_and_the_terminal_event_has_usage(api: openai.AsyncOpenAI) -> None:
    events = await events_of(api)
    created, in_progress, terminal = events[0].response, events[1].response, events[-1].response
    assert (created.status, created.output, created.usage) == ("in_progress", [], None)
    assert (in_progress.status, in_progress.output, in_progress.usage) == ("in_progress", [], None)
    assert terminal.status == "completed"
    assert terminal.usage is not None
    assert terminal.id == created.id
    assert terminal.id.startswith("resp_")


async def test_ttft_delays_the_first_delta(api: openai.AsyncOpenAI) -> None:
    start = anyio.current_time()  # before the request: the simulator's delay starts when it arrives
    stream = await api.responses.create(model="ttft", input=QUESTION, stream=True)
    first = await stream.__anext__()
    async for event in stream:
        if event.type == "response.output_text.delta":
            break
    elapsed = anyio.current_time() - start
    await stream.close()
    assert first.type == "response.created"
    assert elapsed >= 0.05


async def test_same_request_gives_identical_bytes() -> None:
    body = json.dumps({"model": "m", "input": QUESTION, "stream": True}).encode()
    first = await Simulator().handle("POST", "/v1/responses", {}, body)
    second = await Simulator().handle("POST", "/v1/responses", {}, body)
    payload = await read_body(first)
    assert payload == await read_body(second)
    assert payload.startswith(b"event: response.created\ndata: {")
    assert b"[DONE]" not in payload


# -- reasoning, tools, limits ----------------------------------------------------------------


async def test_reasoning_summary_streams_before_the_message(api: openai.AsyncOpenAI) -> None:
    events = await events_of(api, model="reasoner")
    assert squeeze([e.type for e in events]) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        *TEXT_EVENTS,
        "response.completed",
    ]
    summary = texts(events, "response.reasoning_summary_text.delta")
    assert sim_token_count(summary) == 4
    assert [e.output_index for e in events if e.type == "response.output_item.done"] == [0, 1]


async def test_reasoning_item_comes_first_and_counts_in_usage(api: openai.AsyncOpenAI) -> None:
    reply = await api.responses.create(model="reasoner", input=QUESTION)
    reasoning, message = reply.output
    assert reasoning.type == "reasoning"
    assert message.type == "message"
    assert sim_token_count(reasoning.summary[0].text) == 4
    assert reply.usage is not None
    assert reply.usage.output_tokens_details.reasoning_tokens == 4
    assert reply.usage.output_tokens == 4 + sim_token_count(reply.output_text) == 10


async def test_function_call_arguments_are_json_with_the_schemas_keys(api: openai.AsyncOpenAI) -> None:
    reply = await api.responses.create(model="m", input=QUESTION, tools=[WEATHER_TOOL])
    [call] = reply.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert call.call_id.startswith("call_")
    assert call.status == "completed"
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city", "days"}
    assert isinstance(arguments["days"], int)
    assert reply.usage is not None
    assert reply.usage.output_tokens == sim_token_count(call.arguments)


async def test_function_call_arguments_stream_in_fragments(api: openai.AsyncOpenAI) -> None:
    async with api.responses.stream(model="m", input=QUESTION, tools=[WEATHER_TOOL]) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    assert squeeze([e.type for e in events]) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert 2 <= len(fragments) <= 4
    [call] = final.output
    assert call.type == "function_call"
    assert "".join(fragments) == call.arguments


async def test_reply_after_a_function_call_output_begins_with_based_on_the_tool_result(
    api: openai.AsyncOpenAI,
) -> None:
    items: ResponseInputParam = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    reply = await api.responses.create(model="m", input=items, tools=[WEATHER_TOOL])
    assert reply.output[0].type == "message"
    assert reply.output_text.startswith("Based on the tool result,")


async def test_max_output_tokens_cuts_the_reply_and_marks_it_incomplete(api: openai.AsyncOpenAI) -> None:
    reply = await api.responses.create(model="m", input=QUESTION, max_output_tokens=5)
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.max_output_tokens == 5
    assert sim_token_count(reply.output_text) == 5
    assert reply.usage is not None
    assert reply.usage.output_tokens == 5


async def test_a_cut_stream_ends_with_response_incomplete(api: openai.AsyncOpenAI) -> None:
    events = await events_of(api, max_output_tokens=5)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "incomplete"
    assert [e.type for e in events].count("response.completed") == 0
    assert sim_token_count(texts(events)) == 5


# -- kept responses ------------------------------------------------------------------------------


async def test_previous_response_id_continues_the_conversation(api: openai.AsyncOpenAI) -> None:
    first = await api.responses.create(model="m", input=QUESTION)
    follow_up = "And three more"
    chained = await api.responses.create(model="m", input=follow_up, previous_response_id=first.id)
    spelled_out = await api.responses.create(
        model="m",
        input=[
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": follow_up},
        ],
    )
    fresh = await api.responses.create(model="m", input=follow_up)
    assert chained.previous_response_id == first.id
    assert chained.output_text == spelled_out.output_text
    assert chained.output_text != fresh.output_text


async def test_unknown_previous_response_id_is_a_400(api: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await api.responses.create(model="m", input=QUESTION, previous_response_id="resp_nope")
    assert caught.value.param == "previous_response_id"
    assert "Previous response with id 'resp_nope' not found." in caught.value.message


async def test_a_response_with_store_false_is_not_kept(api: openai.AsyncOpenAI) -> None:
    reply = await api.responses.create(model="m", input=QUESTION, store=False)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(reply.id)


async def test_retrieve_returns_a_kept_response(api: openai.AsyncOpenAI) -> None:
    reply = await api.responses.create(model="m", input=QUESTION)
    kept = await api.responses.retrieve(reply.id)
    assert kept.model_dump() == reply.model_dump()


async def test_background_response_is_queued_then_in_progress_then_completed(api: openai.AsyncOpenAI) -> None:
    queued = await api.responses.create(model="slow", input=QUESTION, background=True)
    assert (queued.status, queued.output, queued.usage, queued.background) == ("queued", [], None, True)
    running = await api.responses.retrieve(queued.id)
    assert running.status == "in_progress"
    # Its replay ends when the simulator's clock says the response is done: no sleep.
    replay = await api.responses.retrieve(queued.id, stream=True)
    events = [event async for event in replay]
    done = await api.responses.retrieve(queued.id)
    assert done.status == "completed"
    assert done.output_text == texts(events)
    assert done.usage is not None


async def test_a_background_stream_is_kept_for_retrieve(api: openai.AsyncOpenAI) -> None:
    events = await events_of(api, background=True)
    assert events[0].response.status == "queued"
    assert events[0].response.background is True
    kept = await api.responses.retrieve(events[-1].response.id)
    assert kept.status == "completed"
    assert kept.output_text == texts(events)


async def test_resumed_stream_starts_after_the_given_sequence_number(api: openai.AsyncOpenAI) -> None:
    queued = await api.responses.create(model="m", input=QUESTION, background=True)
    resumed = await api.responses.retrieve(queued.id, stream=True, starting_after=5)
    numbers = [event.sequence_number async for event in resumed]
    assert numbers[0] == 6
    assert numbers == list(range(6, 6 + len(numbers)))


async def test_cancelling_an_unfinished_background_response(api: openai.AsyncOpenAI) -> None:
    queued = await api.responses.create(model="parked", input=QUESTION, background=True)
    cancelled = await api.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert cancelled.output == []
    assert (await api.responses.retrieve(queued.id)).status == "cancelled"


async def test_cancelling_a_finished_response_returns_it_as_it_is(api: openai.AsyncOpenAI) -> None:
    reply = await api.responses.create(model="m", input=QUESTION)
    cancelled = await api.responses.cancel(reply.id)
    assert cancelled.status == "completed"
    assert cancelled.output_text == reply.output_text


async def test_unknown_response_id_is_a_404(api: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="resp_nope"):
        await api.responses.retrieve("resp_nope")


async def test_responses_requests_are_counted_and_recorded(api: openai.AsyncOpenAI, sim: Simulator) -> None:
    reply = await api.responses.create(model="m", input=QUESTION, extra_headers={"x-trace": "abc"})
    await api.responses.retrieve(reply.id)
    assert sim.stats.requests == 2
    assert sim.stats.requests_by_model == {"m": 1}
    assert sim.requests_seen[-1]["input"] == QUESTION
    assert sim.headers_seen[-1]["x-trace"] == "abc"


# -- an upstream without the Responses API ----------------------------------------------------


@pytest.mark.parametrize("sim", [False], indirect=True)
async def test_responses_false_answers_404(api: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="/responses"):
        await api.responses.create(model="m", input=QUESTION)


@pytest.mark.parametrize("sim", [False], indirect=True)
async def test_responses_false_keeps_chat_working(api: openai.AsyncOpenAI) -> None:
    reply = await api.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}])
    assert sim_token_count(reply.choices[0].message.content or "") == 24


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("http_429", openai.RateLimitError),
        ("http_500", openai.InternalServerError),
        ("echo_key", openai.AuthenticationError),
    ],
)
async def test_http_faults_answer_before_any_event(
    api: openai.AsyncOpenAI, sim: Simulator, kind: str, error: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error):
        await events_of(api, fault=kind)
    assert sim.stats.requests_by_model == {"m": 1}


async def test_disconnect_raises_after_the_events_before_it(api: openai.AsyncOpenAI) -> None:
    received: list[Any] = []
    with pytest.raises(DROPPED_MID_STREAM):
        await events_until_error(api, "disconnect;after=3", received)
    assert [e.sequence_number for e in received] == [0, 1, 2]


async def test_stall_past_the_read_timeout_raises_a_timeout(server: ServerThread | None, sim: Simulator) -> None:
    received: list[Any] = []
    async with connect(server, sim, timeout=0.2) as client:
        with pytest.raises(TIMED_OUT_MID_STREAM):
            await events_until_error(client, "stall;after=2", received)
    assert [e.type for e in received] == ["response.created", "response.in_progress"]


async def test_malformed_event_raises_json_decode_error(api: openai.AsyncOpenAI) -> None:
    received: list[Any] = []
    with pytest.raises(json.JSONDecodeError):
        await events_until_error(api, "malformed;after=2", received)
    assert len(received) == 2


async def test_stream_error_sends_an_error_event_and_no_terminal_event(api: openai.AsyncOpenAI) -> None:
    events = await events_of(api, fault="stream_error;after=4")
    assert len(events) == 5
    error = events[-1]
    assert error.type == "error"
    assert (error.code, error.message, error.sequence_number) == ("sim_error", "simulated in-stream error", 4)
    assert not any(e.type.startswith("response.completed") for e in events)


async def test_stream_error_leaves_the_stream_helper_without_a_final_response(api: openai.AsyncOpenAI) -> None:
    extra = {"x-sim-fault": "stream_error;after=4"}
    async with api.responses.stream(model="m", input=QUESTION, extra_headers=extra) as stream:
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()


async def test_invalid_utf8_raises_unicode_decode_error_after_the_next_event(api: openai.AsyncOpenAI) -> None:
    received: list[Any] = []
    with pytest.raises(UnicodeDecodeError):
        await events_until_error(api, "invalid_utf8;after=3", received)
    assert [e.sequence_number for e in received] == [0, 1, 2, 3]


async def test_no_usage_reports_usage_null(api: openai.AsyncOpenAI) -> None:
    events = await events_of(api, fault="no_usage")
    whole = await api.responses.create(model="m", input=QUESTION, extra_headers={"x-sim-fault": "no_usage"})
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is None
    assert whole.usage is None


@pytest.mark.parametrize("kind", ["reject_stream_options", "usage_unasked"])
async def test_chat_only_faults_change_nothing(api: openai.AsyncOpenAI, kind: str) -> None:
    options = {"include_obfuscation": False}
    events = await events_of(api, fault=kind, stream_options=options)
    plain = await events_of(api, stream_options=options)
    assert [e.to_dict() for e in events] == [e.to_dict() for e in plain]


@pytest.mark.parametrize(
    ("kind", "error"),
    [("disconnect", openai.APIConnectionError), ("malformed", json.JSONDecodeError)],
)
async def test_non_streamed_faults_break_the_body(api: openai.AsyncOpenAI, kind: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        await api.responses.create(model="m", input=QUESTION, extra_headers={"x-sim-fault": kind})


async def test_non_streamed_stall_delays_the_whole_reply(server: ServerThread | None, sim: Simulator) -> None:
    async with connect(server, sim, timeout=0.2) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.responses.create(model="m", input=QUESTION, extra_headers={"x-sim-fault": "stall"})


@pytest.mark.parametrize("tools", [[], [WEATHER_TOOL]])
async def test_response_documents_validate_against_the_sdks_model(tools: list[Any]) -> None:
    # The SDK builds its models without validation; this checks every field it requires is there.
    body = json.dumps({"model": "reasoner", "input": QUESTION, "tools": tools}).encode()
    response = await Simulator(MODELS).handle("POST", "/v1/responses", {}, body)
    document = Response.model_validate(json.loads(await read_body(response)))
    assert [item.type for item in document.output] == ["reasoning", "function_call" if tools else "message"]
