"""Usage is requested on the caller's behalf, hidden again, estimated when absent, and priced."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

import moa_stream
from moa_stream.testing import Simulator, sim_client, sim_token_count

from .conftest import EventLog, chat_once, first_stream
from .scripted import Reply, Request, ScriptedUpstream
from .test_sim import WEATHER_TOOL

USER = [{"role": "user", "content": "Tell me about streams"}]


async def collect(stream: openai.AsyncStream[openai.types.chat.ChatCompletionChunk]) -> list[dict[str, object]]:
    return [chunk.model_dump(exclude={"id", "created"}) async for chunk in stream]


async def test_usage_is_requested_upstream_and_hidden_from_the_caller(
    client: openai.AsyncOpenAI, upstream: openai.AsyncOpenAI, log: EventLog, sim: Simulator
) -> None:
    bare = await collect(await upstream.chat.completions.create(model="sim-small", messages=USER, stream=True))
    first = await collect(await client.chat.completions.create(model="sim-small", messages=USER, stream=True))
    teed = await collect(await client.chat.completions.create(model="sim-small", messages=USER, stream=True))
    assert first == teed == bare  # what the caller sees is what the bare SDK shows
    # the first goes out as written and shows that this upstream sends no usage unasked
    assert ["stream_options" in r for r in sim.requests_seen] == [False, False, True]
    assert sim.requests_seen[-1]["stream_options"] == {"include_usage": True}
    await log.wait_turns(2)
    assert [c.usage_source for c in log.of(moa_stream.CallUsage)] == ["estimated", "reported"]


async def test_caller_who_asked_for_usage_sees_it_once(client: openai.AsyncOpenAI, log: EventLog) -> None:
    chunks = await collect(
        await client.chat.completions.create(
            model="sim-small", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    usages = [c["usage"] for c in chunks if c["usage"] is not None]
    assert len(usages) == 1
    await log.wait_turns(1)
    call = log.of(moa_stream.CallUsage)[0]
    assert call.output_tokens == usages[0]["completion_tokens"]  # type: ignore[index]
    assert call.input_tokens == usages[0]["prompt_tokens"]  # type: ignore[index]


async def test_other_stream_options_are_kept(client: openai.AsyncOpenAI, sim: Simulator, log: EventLog) -> None:
    await first_stream(client, log)
    await collect(
        await client.chat.completions.create(
            model="sim-small",
            messages=USER,
            stream=True,
            extra_body={"stream_options": {"continuous_usage_stats": True}},
        )
    )
    assert sim.requests_seen[-1]["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


async def test_upstream_rejecting_stream_options_is_retried_without_and_remembered(
    client: openai.AsyncOpenAI, log: EventLog, sim: Simulator
) -> None:
    await first_stream(client, log)
    headers = {"x-sim-fault": "reject_stream_options"}
    for _ in range(2):
        stream = await client.chat.completions.create(
            model="sim-small", messages=USER, stream=True, extra_headers=headers
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    # first turn: rejected attempt + retry; second turn: no stream_options from the start
    assert ["stream_options" in r for r in list(sim.requests_seen)[1:]] == [True, False, False]
    await log.wait_turns(2)
    calls = log.of(moa_stream.CallUsage)
    assert [c.status for c in calls] == ["completed", "completed"]
    assert calls[0].usage_source == "estimated"
    assert calls[0].output_tokens == sim_token_count(text)  # one word per streamed chunk


async def test_server_without_usage_is_estimated_never_reported_as_zero(
    client: openai.AsyncOpenAI, log: EventLog
) -> None:
    stream = await client.chat.completions.create(model="sim-nousage", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.chat.completions.create(model="sim-nousage", messages=USER)
    await log.wait_turns(2)
    streamed, whole = log.of(moa_stream.CallUsage)
    assert streamed.usage_source == whole.usage_source == "estimated"
    assert streamed.output_tokens == sim_token_count(text)
    assert whole.output_tokens is not None
    assert whole.output_tokens > 0
    assert streamed.input_tokens is not None
    assert streamed.input_tokens > 0


async def test_reasoning_text_and_tokens_are_recorded(client: openai.AsyncOpenAI, log: EventLog) -> None:
    await first_stream(client, log, "sim-reasoner")
    stream = await client.chat.completions.create(model="sim-reasoner", messages=USER, stream=True)
    async for _ in stream:
        pass
    await log.wait_turns(1)
    call = log.of(moa_stream.CallUsage)[0]
    record = log.of(moa_stream.TurnTrace)[0].calls[0]
    assert call.reasoning_tokens == 8
    assert sim_token_count(record.output.reasoning) == 8
    assert record.output.text


async def test_tool_calls_are_assembled_from_fragments(client: openai.AsyncOpenAI, log: EventLog) -> None:
    async with client.chat.completions.stream(model="sim-small", messages=USER, tools=[WEATHER_TOOL]) as stream:  # type: ignore[arg-type]
        final = await stream.get_final_completion()
    await log.wait_turns(1)
    record = log.of(moa_stream.TurnTrace)[0].calls[0]
    sdk_call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    [ours] = record.output.tool_calls
    assert (ours.id, ours.name, ours.arguments) == (sdk_call.id, sdk_call.function.name, sdk_call.function.arguments)  # type: ignore[union-attr]
    assert set(json.loads(ours.arguments)) == {"city", "days", "metric"}
    assert record.finish_reason == "tool_calls"


async def test_cost_comes_from_the_price_table(upstream: openai.AsyncOpenAI, log: EventLog) -> None:
    prices = {"sim-small": {"input_cost_per_token": 1e-6, "output_cost_per_token": 3e-6}}
    client = moa_stream.wrap(upstream, sinks=[log], prices=prices)
    await client.chat.completions.create(model="sim-small", messages=USER)
    await client.chat.completions.create(model="unpriced-model", messages=USER)
    await client.close()
    priced, unpriced = log.of(moa_stream.CallUsage)
    assert priced.cost_usd == pytest.approx(priced.input_tokens * 1e-6 + priced.output_tokens * 3e-6)  # type: ignore[operator]
    assert unpriced.cost_usd is None
    priced_end, unpriced_end = log.of(moa_stream.TurnEnd)
    assert (priced_end.cost_complete, unpriced_end.cost_complete) == (True, False)


async def test_session_header_names_the_session_and_is_not_sent_upstream(
    client: openai.AsyncOpenAI, log: EventLog, sim: Simulator
) -> None:
    await client.chat.completions.create(model="sim-small", messages=USER, extra_headers={"X-MoA-Session": "s/../1"})
    with moa_stream.session("from-context") as name:
        await client.chat.completions.create(model="sim-small", messages=USER)
    await log.wait_turns(2)
    first, second = log.of(moa_stream.CallUsage)
    assert first.session_id == moa_stream.sanitize_session_id("s/../1")
    assert "/" not in first.session_id
    assert second.session_id == name == "from-context"
    assert all(moa_stream.SESSION_HEADER not in {k.lower() for k in h} for h in sim.headers_seen)


async def test_a_request_needing_no_change_reaches_the_upstream_as_the_callers_own(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rebuilding a request costs more than the rest of the metering of a call: a non-streamed call
    # with nothing of ours in it goes on as the object the caller's SDK built.
    client = moa_stream.wrap(sim_client(sim))
    seen: list[Any] = []
    metering = client._client._transport  # type: ignore[attr-defined]
    inner_send = metering.inner.handle_async_request

    async def inner(request: Any) -> Any:
        seen.append(request)
        return await inner_send(request)

    outer_send = metering.handle_async_request

    async def outer(request: Any) -> Any:
        seen.append(request)
        return await outer_send(request)

    monkeypatch.setattr(metering.inner, "handle_async_request", inner)
    monkeypatch.setattr(metering, "handle_async_request", outer)
    await client.chat.completions.create(model="sim-small", messages=USER)
    await chat_once(client, "sim-small", stream=True)  # the first stream teaches what the upstream sends
    await chat_once(client, "sim-small", stream=True)
    await client.chat.completions.create(model="sim-small", messages=USER, extra_headers={"X-MoA-Session": "a"})
    await client.close()

    plain, learning, streamed, with_session = seen[0:2], seen[2:4], seen[4:6], seen[6:8]
    assert plain[1] is plain[0]
    assert learning[1].content == learning[0].content
    assert learning[1].headers["accept-encoding"] == "identity"  # a stream is teed chunk by chunk
    assert streamed[1] is not streamed[0]  # usage asked for on the caller's behalf: a new body
    assert streamed[1].headers["accept-encoding"] == "identity"
    assert int(streamed[1].headers["content-length"]) == len(streamed[1].content) > len(streamed[0].content)
    assert with_session[1] is not with_session[0]
    assert moa_stream.SESSION_HEADER not in with_session[1].headers
    assert with_session[1].content == with_session[0].content


async def test_cache_writes_an_upstream_reports_add_up_in_the_turn_and_the_ledger(log: EventLog) -> None:
    # An Anthropic-compatible server's non-streamed answer with prompt-cache writes and reads.
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "claude-compatible",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 120,
            "completion_tokens": 3,
            "total_tokens": 123,
            "cache_creation_input_tokens": 100,
            "prompt_tokens_details": {"cached_tokens": 7},
        },
    }

    def handler(request: Request) -> Reply:
        return Reply(headers=[("content-type", "application/json")], parts=[json.dumps(body).encode()])

    with ScriptedUpstream(handler) as upstream:
        bare = openai.AsyncOpenAI(base_url=upstream.base_url, api_key="sk-test", max_retries=0)
        client = moa_stream.wrap(bare, sinks=[log])
        with moa_stream.session("cached"):
            for _ in range(2):
                await client.chat.completions.create(
                    model="claude-compatible", messages=[{"role": "user", "content": "x"}]
                )
        await client.close()
    assert [usage.cache_write_tokens for usage in log.of(moa_stream.CallUsage)] == [100, 100]
    assert [end.cache_write_tokens for end in log.of(moa_stream.TurnEnd)] == [100, 100]
    totals = moa_stream.session_ledger(client, "cached").totals
    assert (totals.cache_write_tokens, totals.cached_input_tokens) == (200, 14)
