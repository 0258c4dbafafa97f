"""Every way a call can end produces exactly one CallUsage, one TurnEnd and one TurnTrace."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Awaitable, Callable

import anyio
import openai
import pytest

import moa_stream

from .conftest import DROPPED_MID_STREAM, TIMED_OUT_MID_STREAM, EventLog

USER = [{"role": "user", "content": "Tell me about streams"}]


async def ended(log: EventLog) -> tuple[moa_stream.CallUsage, moa_stream.TurnTrace]:
    """The single call and trace of a one-call turn, once its turn has ended."""
    await log.wait_turns(1)
    calls, ends, traces = log.of(moa_stream.CallUsage), log.of(moa_stream.TurnEnd), log.of(moa_stream.TurnTrace)
    assert (len(calls), len(ends), len(traces)) == (1, 1, 1), log.events
    assert ends[0].status == calls[0].status
    assert traces[0].calls[0].usage == calls[0]
    return calls[0], traces[0]


async def collect_garbage() -> None:
    """What the interpreter does on its own sooner or later: run the loop's async-generator
    finalizer tasks, then collect the reference cycles they leave behind."""
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
        gc.collect()


def fault(kind: str, after: int = 2) -> dict[str, str]:
    return {"x-sim-fault": f"{kind};after={after}"}


async def test_completed_stream(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.chat.completions.create(model="sim-large", messages=USER, stream=True)
    seen = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    call, trace = await ended(log)
    assert call.status == "completed"
    assert call.finish_reason == "stop"
    assert trace.calls[0].output_source == "inline_from_stream"
    assert trace.calls[0].output.text == seen
    assert trace.calls[0].input_messages == USER


async def test_break_then_close_is_closed_early_with_partial_text(
    client: openai.AsyncOpenAI, log: EventLog, sim_idle: Callable[[], Awaitable[None]]
) -> None:
    stream = await client.chat.completions.create(model="sim-large", messages=USER, stream=True)
    seen = ""
    async for chunk in stream:
        seen += chunk.choices[0].delta.content or ""
        if len(seen.split()) >= 3:
            break
    await stream.close()
    call, trace = await ended(log)
    assert call.status == "closed_early"
    assert trace.calls[0].output_source == "partial_stream"
    assert trace.calls[0].output.text.startswith(seen)
    assert call.usage_source == "estimated"
    await sim_idle()  # the upstream response was closed, not left to the garbage collector


async def test_leaving_async_with_early_is_closed_early(client: openai.AsyncOpenAI, log: EventLog) -> None:
    async with await client.chat.completions.create(model="sim-large", messages=USER, stream=True) as stream:
        async for _ in stream:
            break
    call, _ = await ended(log)
    assert call.status == "closed_early"


async def test_abandoned_stream_is_closed_early_when_collected(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.chat.completions.create(model="sim-large", messages=USER, stream=True)
    async for _ in stream:
        break
    del stream
    await collect_garbage()
    call, _ = await ended(log)
    assert call.status == "closed_early"


async def test_stream_never_iterated_is_closed_early_when_collected(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.chat.completions.create(model="sim-large", messages=USER, stream=True)
    del stream
    await collect_garbage()
    call, trace = await ended(log)
    assert call.status == "closed_early"
    assert trace.calls[0].output_source == "none"


async def test_cancelled_while_waiting_for_a_chunk(client: openai.AsyncOpenAI, log: EventLog) -> None:
    got_chunks = anyio.Event()

    async def consume() -> None:
        stream = await client.chat.completions.create(model="sim-stall", messages=USER, stream=True)
        async with stream:
            count = 0
            async for _ in stream:
                count += 1
                if count == 3:
                    got_chunks.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await got_chunks.wait()
        tg.cancel_scope.cancel()
    call, trace = await ended(log)
    assert call.status == "cancelled"
    assert trace.calls[0].output_source == "partial_stream"


async def test_cancelled_inside_the_callers_loop_body(client: openai.AsyncOpenAI, log: EventLog) -> None:
    with anyio.CancelScope() as scope:
        async with await client.chat.completions.create(model="sim-large", messages=USER, stream=True) as stream:
            async for _ in stream:
                scope.cancel()
                await anyio.lowlevel.checkpoint()
    call, _ = await ended(log)
    assert call.status == "cancelled"


async def test_each_chunk_fetched_by_another_task_completes_once(client: openai.AsyncOpenAI, log: EventLog) -> None:
    # LangChain fetches every chunk with asyncio.wait_for(anext(...)), i.e. from a new task each time.
    stream = await client.chat.completions.create(model="sim-small", messages=USER, stream=True)
    iterator = stream.__aiter__()
    chunks = 0
    while True:
        try:
            await asyncio.wait_for(iterator.__anext__(), timeout=10)
        except StopAsyncIteration:
            break
        chunks += 1
    call, _ = await ended(log)
    assert call.status == "completed"
    assert chunks > 3


async def test_per_chunk_timeout_from_another_task_is_cancelled(client: openai.AsyncOpenAI, log: EventLog) -> None:
    stream = await client.chat.completions.create(model="sim-stall", messages=USER, stream=True)
    iterator = stream.__aiter__()
    with pytest.raises(asyncio.TimeoutError):
        while True:
            await asyncio.wait_for(iterator.__anext__(), timeout=0.2)
    await stream.close()
    call, _ = await ended(log)
    assert call.status == "cancelled"


# -- errors: the caller sees what the bare SDK raises ------------------------------------------


async def bare_error(upstream: openai.AsyncOpenAI, headers: dict[str, str], *, stream: bool) -> type[BaseException]:
    try:
        if stream:
            async for _ in await upstream.chat.completions.create(
                model="sim-small", messages=USER, stream=True, extra_headers=headers
            ):
                pass
        else:
            await upstream.chat.completions.create(model="sim-small", messages=USER, extra_headers=headers)
    except BaseException as exc:
        return type(exc)
    raise AssertionError("the bare SDK raised nothing")


@pytest.mark.parametrize(
    ("kind", "stream", "expected"),
    [
        ("http_500", True, openai.InternalServerError),
        ("http_500", False, openai.InternalServerError),
        ("http_429", False, openai.RateLimitError),
        # openai 3.x wraps a dropped connection in APIConnectionError; 2.x lets httpx's error through
        ("disconnect", True, DROPPED_MID_STREAM),
        ("stream_error", True, openai.APIError),
        ("malformed", True, json.JSONDecodeError),
    ],
)
async def test_upstream_errors_raise_what_the_bare_sdk_raises(
    client: openai.AsyncOpenAI,
    upstream: openai.AsyncOpenAI,
    log: EventLog,
    kind: str,
    stream: bool,
    expected: type[BaseException] | tuple[type[BaseException], ...],
) -> None:
    bare = await bare_error(upstream, fault(kind), stream=stream)
    assert issubclass(bare, expected)
    with pytest.raises(bare) as raised:
        if stream:
            async for _ in await client.chat.completions.create(
                model="sim-small", messages=USER, stream=True, extra_headers=fault(kind)
            ):
                pass
        else:
            await client.chat.completions.create(model="sim-small", messages=USER, extra_headers=fault(kind))
    assert type(raised.value) is bare
    call, _ = await ended(log)
    assert call.status == "error"
    assert call.error
    if kind.startswith("http_"):
        assert call.http_status == int(kind[5:])
        assert call.usage_source == "missing"
        assert call.input_tokens is None


async def test_disconnect_keeps_the_partial_text(client: openai.AsyncOpenAI, log: EventLog) -> None:
    seen = ""
    with pytest.raises(DROPPED_MID_STREAM):
        async for chunk in await client.chat.completions.create(
            model="sim-large", messages=USER, stream=True, extra_headers=fault("disconnect", after=5)
        ):
            seen += chunk.choices[0].delta.content or ""
    call, trace = await ended(log)
    assert call.status == "error"
    assert seen
    assert trace.calls[0].output.text == seen
    assert trace.calls[0].output_source == "partial_stream"


async def test_stall_past_the_read_timeout_is_an_error(client: openai.AsyncOpenAI, log: EventLog) -> None:
    with pytest.raises(TIMED_OUT_MID_STREAM):
        async for _ in await client.with_options(timeout=0.3).chat.completions.create(
            model="sim-stall", messages=USER, stream=True
        ):
            pass
    call, _ = await ended(log)
    assert call.status == "error"
    assert "Timeout" in (call.error or "")


async def test_sdk_retries_are_separate_calls(upstream: openai.AsyncOpenAI, log: EventLog) -> None:
    wrapped = moa_stream.wrap(upstream.with_options(max_retries=2), sinks=[log])
    with pytest.raises(openai.RateLimitError):
        await wrapped.chat.completions.create(model="sim-small", messages=USER, extra_headers=fault("http_429"))
    await wrapped.close()
    assert [c.http_status for c in log.of(moa_stream.CallUsage)] == [429, 429, 429]
    assert len(log.of(moa_stream.TurnEnd)) == 3


async def test_connection_refused_is_an_error_call(log: EventLog) -> None:
    dead = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=0)
    wrapped = moa_stream.wrap(dead, sinks=[log])
    with pytest.raises(openai.APIConnectionError):
        await wrapped.chat.completions.create(model="sim-small", messages=USER)
    await wrapped.close()
    [call] = log.of(moa_stream.CallUsage)
    assert call.status == "error"
    assert call.http_status is None
    assert call.usage_source == "missing"
