"""Sinks get every event off the caller's path: slow or failing sinks never touch the stream."""

from __future__ import annotations

import threading

import anyio
import openai
import pytest

import moa_stream
from moa_stream._sdk import find_engine

from .conftest import EventLog

USER = [{"role": "user", "content": "Tell me about streams"}]


async def stream_once(client: openai.AsyncOpenAI) -> str:
    stream = await client.chat.completions.create(model="sim-small", messages=USER, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_blocked_sink_does_not_hold_up_the_stream(upstream: openai.AsyncOpenAI, log: EventLog) -> None:
    release = threading.Event()

    def blocked(event: moa_stream.Event) -> None:
        release.wait()

    client = moa_stream.wrap(upstream, sinks=[blocked, log])
    # If delivery were on the caller's path, these streams could never finish while the sink blocks.
    for _ in range(3):
        assert await stream_once(client)
    await log.wait_turns(3)
    release.set()
    await client.close()
    [blocked_stats, log_stats] = moa_stream.sink_stats(client)
    assert blocked_stats.delivered == log_stats.delivered == 9


async def test_raising_sink_is_counted_and_others_still_receive(upstream: openai.AsyncOpenAI, log: EventLog) -> None:
    def broken(event: moa_stream.Event) -> None:
        raise RuntimeError("sink is down")

    client = moa_stream.wrap(upstream, sinks=[broken, log])
    assert await stream_once(client)
    await client.close()
    [broken_stats, log_stats] = moa_stream.sink_stats(client)
    assert (broken_stats.failed, broken_stats.delivered) == (3, 0)
    assert log_stats.delivered == 3
    assert len(log.of(moa_stream.CallUsage)) == 1


async def test_full_sink_buffer_drops_and_counts(upstream: openai.AsyncOpenAI, log: EventLog) -> None:
    release = threading.Event()

    def blocked(event: moa_stream.Event) -> None:
        release.wait()

    client = moa_stream.wrap(upstream, sinks=[log])
    moa_stream.add_sink(client, blocked, name="blocked", buffer=2)
    for _ in range(4):
        assert await stream_once(client)
    await log.wait_turns(4)  # every event has been fanned out to both sinks by now
    release.set()
    await client.close()
    stats = {s.name: s for s in moa_stream.sink_stats(client)}
    # 12 events: one batch in the sink's hands, two buffered, the rest dropped and counted
    assert stats["blocked"].delivered + stats["blocked"].dropped == 12
    assert stats["blocked"].dropped >= 1
    assert stats["blocked"].delivered >= 1
    assert len(log.events) == 12


async def test_async_sink_receives_events(upstream: openai.AsyncOpenAI) -> None:
    received: list[moa_stream.Event] = []

    async def sink(event: moa_stream.Event) -> None:
        await anyio.lowlevel.checkpoint()
        received.append(event)

    client = moa_stream.wrap(upstream, sinks=[sink])
    await stream_once(client)
    await client.close()
    assert [type(e) for e in received] == [moa_stream.CallUsage, moa_stream.TurnEnd, moa_stream.TurnTrace]


async def test_sink_added_later_receives_later_events(upstream: openai.AsyncOpenAI, log: EventLog) -> None:
    client = moa_stream.wrap(upstream)
    await stream_once(client)
    moa_stream.add_sink(client, log)
    await stream_once(client)
    await client.close()
    assert len(log.of(moa_stream.CallUsage)) == 1


async def test_flush_delivers_without_closing(upstream: openai.AsyncOpenAI) -> None:
    received: list[moa_stream.Event] = []
    client = moa_stream.wrap(upstream, sinks=[received.append])
    await stream_once(client)
    assert await moa_stream.flush(client)
    assert len(received) == 3
    assert await stream_once(client)  # still usable
    await client.close()
    assert len(received) == 6


async def test_close_is_idempotent_and_later_events_are_counted_as_dropped(upstream: openai.AsyncOpenAI) -> None:
    received: list[moa_stream.Event] = []
    client = moa_stream.wrap(upstream, sinks=[received.append])
    await stream_once(client)
    await client.close()
    await client.close()
    assert len(received) == 3
    assert [s.dropped for s in moa_stream.sink_stats(client)] == [0]


async def stuck_async_sink(event: moa_stream.Event) -> None:
    await anyio.sleep_forever()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_sink_stuck_for_good_is_abandoned_at_close_and_its_events_counted(
    upstream: openai.AsyncOpenAI, log: EventLog, kind: str
) -> None:
    never = threading.Event()

    def stuck_sync_sink(event: moa_stream.Event) -> None:
        never.wait()

    stuck = stuck_sync_sink if kind == "sync" else stuck_async_sink
    client = moa_stream.wrap(upstream, sinks=[stuck, log], drain_timeout=0.2)
    for _ in range(2):
        assert await stream_once(client)
    await log.wait_turns(2)
    assert not await moa_stream.flush(client)  # the stuck sink cannot be drained
    await client.close()  # returns after the drain timeout instead of waiting for the sink
    engine = find_engine(client)
    [stuck_stats, log_stats] = engine.sink_stats()
    assert log_stats.delivered == 6
    assert (stuck_stats.delivered, stuck_stats.dropped) == (0, 6)
    assert engine.dispatcher._thread is not None
    engine.dispatcher._thread.join(10)  # ends, though a loaded machine may take it past close()
    assert not engine.dispatcher._thread.is_alive()
    never.set()
