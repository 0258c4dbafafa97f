"""The Responses API through a wrapped client: every SDK path metered once, the caller's bytes the
bare SDK's, usage from the terminal event, every exit path, background responses."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import openai
import pytest
from openai.types.responses import FunctionToolParam, Response

import moa_stream
from moa_stream.testing import Fault, SimModel, Simulator, sim_token_count

from .conftest import DROPPED_MID_STREAM, EventLog

QUESTION = "Name three rivers please"
TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
Wrapped = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
def sim() -> Simulator:
    return Simulator(
        [
            SimModel(name="m"),
            SimModel(name="long", reply_tokens=40),
            SimModel(name="reasoner", reasoning_tokens=4),
            SimModel(name="stall", fault=Fault(kind="stall", after_chunks=4)),
            SimModel(name="slow", ttft_s=0.2, tokens_per_s=200.0),
            # Still running when a cancel or a close comes right after the create, however loaded
            # the machine is.
            SimModel(name="stalled", ttft_s=5.0),
        ]
    )


async def only_call(log: EventLog) -> tuple[moa_stream.CallUsage, moa_stream.TurnTrace]:
    await log.wait_turns(1)
    [call], [end], [trace] = log.of(moa_stream.CallUsage), log.of(moa_stream.TurnEnd), log.of(moa_stream.TurnTrace)
    assert end.calls == 1
    assert trace.calls[0].usage == call
    return call, trace


def text_of(response: Response) -> str:
    return response.output_text


# -- every SDK path ------------------------------------------------------------------------------


async def test_create_not_streamed_is_metered_with_reported_usage(client: openai.AsyncOpenAI, log: EventLog) -> None:
    response = await client.responses.create(model="m", input=QUESTION)
    call, trace = await only_call(log)
    assert (call.api, call.status, call.usage_source) == ("responses", "completed", "reported")
    assert call.output_tokens == response.usage.output_tokens == sim_token_count(text_of(response))  # type: ignore[union-attr]
    assert call.input_tokens == response.usage.input_tokens  # type: ignore[union-attr]
    record = trace.calls[0]
    assert (record.api, record.response_id, record.output.text) == ("responses", response.id, text_of(response))
    assert record.output_source == "inline"
    assert record.input_messages == [{"role": "user", "content": QUESTION}]


async def test_create_streamed_is_metered_from_the_terminal_event(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.responses.create(model="m", input=QUESTION, stream=True)
    text = ""
    async for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
    call, trace = await only_call(log)
    assert (call.status, call.usage_source, call.output_tokens) == ("completed", "reported", sim_token_count(text))
    assert call.finish_reason == "completed"
    assert call.ttft_s is not None
    assert trace.calls[0].output.text == text
    assert trace.calls[0].output_source == "inline_from_stream"


async def test_stream_helper_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    async with client.responses.stream(model="m", input=QUESTION) as stream:
        final = await stream.get_final_response()
    call, trace = await only_call(log)
    assert (call.status, call.output_tokens) == ("completed", final.usage.output_tokens)  # type: ignore[union-attr]
    assert trace.calls[0].output.text == final.output_text


async def test_parse_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    parsed = await client.responses.parse(model="m", input=QUESTION)
    call, _ = await only_call(log)
    assert call.output_tokens == parsed.usage.output_tokens  # type: ignore[union-attr]


async def test_with_raw_response_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    raw = await client.responses.with_raw_response.create(model="m", input=QUESTION)
    response = raw.parse()
    call, _ = await only_call(log)
    assert (call.request_id, call.output_tokens) == (raw.headers["x-request-id"], response.usage.output_tokens)  # type: ignore[union-attr]


async def test_with_streaming_response_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    async with client.responses.with_streaming_response.create(model="m", input=QUESTION, stream=True) as raw:
        async for _ in raw.iter_bytes():
            pass
    call, _ = await only_call(log)
    assert (call.status, call.usage_source) == ("completed", "reported")


async def test_with_options_copies_are_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    await client.with_options(timeout=20, max_retries=0).responses.create(model="m", input=QUESTION)
    call, _ = await only_call(log)
    assert call.status == "completed"


async def test_a_frameworks_direct_post_is_metered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    await client.post("/responses", cast_to=Response, body={"model": "m", "input": QUESTION})
    call, _ = await only_call(log)
    assert (call.api, call.usage_source) == ("responses", "reported")


async def test_other_responses_endpoints_pass_through_unmetered(client: openai.AsyncOpenAI, log: EventLog) -> None:
    created = await client.responses.create(model="m", input=QUESTION)
    again = await client.responses.retrieve(created.id)
    assert again.id == created.id
    await moa_stream.flush(client)
    assert len(log.of(moa_stream.CallUsage)) == 1  # the create only


# -- what is recorded, and what the caller gets ------------------------------------------------------


async def test_caller_gets_the_bare_sdks_bytes(
    client: openai.AsyncOpenAI, upstream: openai.AsyncOpenAI, log: EventLog
) -> None:
    async def raw(api: openai.AsyncOpenAI) -> bytes:
        async with api.responses.with_streaming_response.create(model="m", input=QUESTION, stream=True) as response:
            return b"".join([part async for part in response.iter_bytes()])

    assert await raw(client) == await raw(upstream)


async def test_function_calls_instructions_tools_and_the_chain_are_recorded(
    client: openai.AsyncOpenAI, log: EventLog
) -> None:
    first = await client.responses.create(model="m", input=QUESTION, instructions="Be brief.", tools=[TOOL])
    [call_item] = [item for item in first.output if item.type == "function_call"]
    follow_up = [{"type": "function_call_output", "call_id": call_item.call_id, "output": "sunny"}]
    second = await client.responses.create(model="m", input=follow_up, previous_response_id=first.id)  # type: ignore[arg-type]
    await log.wait_turns(2)
    one, two = (trace.calls[0] for trace in log.of(moa_stream.TurnTrace))
    assert (one.instructions, one.tools, one.response_id) == ("Be brief.", [TOOL], first.id)
    [tool] = one.output.tool_calls
    assert (tool.id, tool.name, tool.arguments) == (call_item.call_id, "get_weather", call_item.arguments)
    assert (two.previous_response_id, two.response_id) == (first.id, second.id)  # a chain across trace lines
    assert two.input_messages == follow_up
    assert two.output.text == second.output_text


async def test_reasoning_summary_and_tokens_are_recorded(client: openai.AsyncOpenAI, log: EventLog) -> None:
    response = await client.responses.create(model="reasoner", input=QUESTION)
    call, trace = await only_call(log)
    assert call.reasoning_tokens == response.usage.output_tokens_details.reasoning_tokens == 4  # type: ignore[union-attr]
    assert sim_token_count(trace.calls[0].output.reasoning) == 4


async def test_an_incomplete_response_is_completed_with_its_reason(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.responses.create(model="long", input=QUESTION, max_output_tokens=5, stream=True)
    async for _ in stream:
        pass
    call, _ = await only_call(log)
    assert (call.status, call.finish_reason, call.output_tokens) == ("completed", "max_output_tokens", 5)


async def test_an_in_stream_error_makes_the_call_an_error_with_its_reason(
    client: openai.AsyncOpenAI, log: EventLog
) -> None:
    stream = await client.responses.create(
        model="m", input=QUESTION, stream=True, extra_headers={"x-sim-fault": "stream_error;after=4"}
    )
    assert "error" in [event.type async for event in stream]  # the SDK hands it on as an event
    call, _ = await only_call(log)
    assert call.status == "error"
    assert call.error is not None
    assert "simulated in-stream error" in call.error


async def test_a_stream_ending_without_a_terminal_event_is_estimated(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.responses.create(
        model="m", input=QUESTION, stream=True, extra_headers={"x-sim-fault": "no_usage"}
    )
    async for _ in stream:
        pass
    call, _ = await only_call(log)
    assert (call.status, call.usage_source) == ("completed", "estimated")
    assert call.output_tokens is not None
    assert call.output_tokens > 0


async def test_cost_comes_from_the_price_table(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(prices={"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}})
    await client.responses.create(model="m", input=QUESTION)
    call, _ = await only_call(log)
    assert call.cost_usd == pytest.approx(call.input_tokens * 1e-6 + call.output_tokens * 2e-6)  # type: ignore[operator]


# -- every exit path ------------------------------------------------------------------------------------


async def test_break_then_close_is_closed_early(
    client: openai.AsyncOpenAI, log: EventLog, sim_idle: Callable[[], Awaitable[None]]
) -> None:
    stream = await client.responses.create(model="long", input=QUESTION, stream=True)
    async for event in stream:
        if event.type == "response.output_text.delta":
            break
    await stream.close()
    call, trace = await only_call(log)
    assert (call.status, call.usage_source) == ("closed_early", "estimated")
    assert trace.calls[0].output_source == "partial_stream"
    await sim_idle()


async def test_leaving_async_with_early_is_closed_early(client: openai.AsyncOpenAI, log: EventLog) -> None:
    async with await client.responses.create(model="long", input=QUESTION, stream=True) as stream:
        async for _ in stream:
            break
    call, _ = await only_call(log)
    assert call.status == "closed_early"


async def test_an_abandoned_stream_is_closed_early_when_collected(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.responses.create(model="long", input=QUESTION, stream=True)
    async for _ in stream:
        break
    del stream
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
        gc.collect()
    call, _ = await only_call(log)
    assert call.status == "closed_early"


async def test_cancelled_while_waiting_for_an_event(client: openai.AsyncOpenAI, log: EventLog) -> None:
    started = anyio.Event()

    async def consume() -> None:
        async with await client.responses.create(model="stall", input=QUESTION, stream=True) as stream:
            async for _ in stream:
                started.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(consume)
        await started.wait()
        tasks.cancel_scope.cancel()
    call, _ = await only_call(log)
    assert call.status == "cancelled"


async def test_a_close_after_the_answer_reads_the_terminal_event_off_the_callers_path(
    client: openai.AsyncOpenAI, log: EventLog
) -> None:
    stream = await client.responses.create(model="m", input=QUESTION, stream=True)
    async for event in stream:
        if event.type == "response.output_item.done":
            break
    await stream.close()
    call, _ = await only_call(log)
    assert (call.status, call.usage_source) == ("completed", "reported")


@pytest.mark.parametrize(
    ("fault", "raised"),
    [("http_500", openai.InternalServerError), ("disconnect;after=3", DROPPED_MID_STREAM)],
)
async def test_http_errors_and_disconnects_are_errors(
    client: openai.AsyncOpenAI, log: EventLog, fault: str, raised: Any
) -> None:
    with pytest.raises(raised):
        stream = await client.responses.create(
            model="m", input=QUESTION, stream=True, extra_headers={"x-sim-fault": fault}
        )
        async for _ in stream:
            pass
    call, _ = await only_call(log)
    assert call.status == "error"


async def test_invalid_utf8_gives_the_caller_the_sdks_error_and_the_call_an_error(
    client: openai.AsyncOpenAI, log: EventLog
) -> None:
    with pytest.raises(UnicodeDecodeError):
        stream = await client.responses.create(
            model="m", input=QUESTION, stream=True, extra_headers={"x-sim-fault": "invalid_utf8;after=3"}
        )
        async for _ in stream:
            pass
    call, _ = await only_call(log)
    assert call.status == "error"
    assert call.error is not None
    assert "UTF-8" in call.error


# -- background responses -------------------------------------------------------------------------------


async def test_a_background_response_is_metered_once_when_a_retrieve_sees_it_finished(
    client: openai.AsyncOpenAI, log: EventLog
) -> None:
    created = await client.responses.create(model="slow", input=QUESTION, background=True)
    assert created.status == "queued"
    await moa_stream.flush(client)
    assert log.of(moa_stream.CallUsage) == []  # not finished: nothing to meter yet
    seen = created
    while seen.status in ("queued", "in_progress"):
        await anyio.sleep(0.05)
        seen = await client.responses.retrieve(created.id)
    await client.responses.retrieve(created.id)  # a second look meters nothing more
    call, trace = await only_call(log)
    assert (call.status, call.usage_source, call.output_tokens) == ("completed", "reported", seen.usage.output_tokens)  # type: ignore[union-attr]
    assert trace.calls[0].output.text == seen.output_text


async def test_a_cancelled_background_response_is_metered_as_cancelled(
    client: openai.AsyncOpenAI, log: EventLog
) -> None:
    created = await client.responses.create(model="stalled", input=QUESTION, background=True)
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    call, _ = await only_call(log)
    assert call.status == "cancelled"


async def test_a_background_response_still_running_at_close_is_closed_early(
    client: openai.AsyncOpenAI, log: EventLog
) -> None:
    await client.responses.create(model="stalled", input=QUESTION, background=True)
    await client.close()
    call, _ = await only_call(log)
    assert call.status == "closed_early"
    assert call.error is not None
    assert "background" in call.error
