"""What only a shared store does, on a real Redis: clients in step with each other, leases that free
a crashed process's holds, outages under both policies, and a layout that says what it is."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
import redis

import moa_stream
from moa_stream import Budget, ConfigError, Limits, Preset, StoreConfig
from moa_stream._holds import Amounts, Hold, ScopeLimits
from moa_stream._redis_store import RedisStore
from moa_stream._wrap import _engine_of
from moa_stream.testing import SimModel, Simulator, sim_client

from .conftest import EventLog, tool_loop
from .conftest import chat_once as ask
from .redis_server import RedisServer

MODELS = ("ref-a", "ref-b", "agg", "sim-small")
PRESETS = {"duo": Preset(references=["ref-a", "ref-b"], aggregator="agg")}


def make(sim: Simulator, store: str | StoreConfig, log: EventLog | None = None, **options: Any) -> openai.AsyncOpenAI:
    return moa_stream.wrap(
        sim_client(sim, max_retries=0, api_key="sk-secret-in-the-client"),
        sinks=[log] if log is not None else [],
        store=store,
        presets=PRESETS,
        **options,
    )


def simulator() -> Simulator:
    return Simulator([SimModel(name=name) for name in MODELS])


async def test_a_session_budget_set_through_one_client_binds_another(redis_url: str) -> None:
    sim = simulator()
    first, second = make(sim, redis_url), make(sim, redis_url)
    moa_stream.set_session_budget(first, "user-7", Budget(session=Limits(calls=2)))
    with moa_stream.session("user-7"):
        await ask(first)
        await ask(second)
        with pytest.raises(moa_stream.BudgetExceeded, match=r"session\.calls is 2 calls"):
            await ask(second)
    await first.close()
    await second.close()
    assert moa_stream.session_ledger(second, "user-7").totals.calls == 2


async def test_a_tool_loop_reuses_references_cached_by_another_client(redis_url: str) -> None:
    sim, log = simulator(), EventLog()
    first, second = make(sim, redis_url, log), make(sim, redis_url, log)
    question, loop = tool_loop()
    with moa_stream.session("loop"):
        await first.chat.completions.create(model="moa:duo", messages=question)  # type: ignore[arg-type]
        await second.chat.completions.create(model="moa:duo", messages=loop)  # type: ignore[arg-type]
    await first.close()
    await second.close()
    traces = sorted(log.of(moa_stream.TurnTrace), key=lambda trace: trace.end.started_at)
    assert [trace.cadence for trace in traces] == ["miss", "hit"]
    assert sim.stats.requests_by_model == {"ref-a": 1, "ref-b": 1, "agg": 2}


async def test_what_one_client_learned_about_an_upstream_another_reads(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("moa_stream._redis_store._QUIRKS_REFRESH_S", 0.0)
    sim = simulator()
    first, second = make(sim, redis_url), make(sim, redis_url)
    origin = "http://upstream.example:8000"
    _engine_of(first).quirks.learn_unasked_usage(origin, "m", chunk=True, key=False)
    _engine_of(first).quirks.learn_lacks_responses(origin)
    assert await moa_stream.flush(first)
    quirks = _engine_of(second).quirks
    with anyio.fail_after(5):
        while quirks.unasked_usage(origin, "m") is None or not quirks.lacks_responses(origin):
            await _engine_of(second).open_session("any")
            await anyio.sleep(0.01)
    assert quirks.unasked_usage(origin, "m") == (True, False)
    await first.close()
    await second.close()


async def test_a_crashed_processs_holds_expire_after_their_lease(redis_url: str) -> None:
    crashed = RedisStore(StoreConfig(url=redis_url, lease_s=0.5))
    survivor = RedisStore(StoreConfig(url=redis_url, lease_s=0.5))
    scopes = [ScopeLimits("session", "s", Limits(calls=1))]
    one = Amounts(calls=1)
    admitted, _ = await crashed.reserve("s", scopes, [Hold(call_id="lost", amounts=one)])
    assert [hold.call_id for hold in admitted] == ["lost"]
    crashed._thread.stop()  # gone without settling or releasing, and without renewing its lease
    started = time.monotonic()
    admitted, breach = await survivor.reserve("s", scopes, [Hold(call_id="next", amounts=one)])
    assert admitted == []
    assert breach is not None
    assert breach.limit == "calls"
    with anyio.fail_after(5):
        while not admitted:
            await anyio.sleep(0.05)
            admitted, _ = await survivor.reserve("s", scopes, [Hold(call_id="next", amounts=one)])
    assert 0.4 < time.monotonic() - started < 3
    await survivor.aclose()


async def test_holds_of_calls_still_running_are_renewed(redis_url: str) -> None:
    store = RedisStore(StoreConfig(url=redis_url, lease_s=0.3))
    other = RedisStore(StoreConfig(url=redis_url, lease_s=0.3))
    scopes = [ScopeLimits("session", "s", Limits(calls=1))]
    await store.reserve("s", scopes, [Hold(call_id="long", amounts=Amounts(calls=1))])
    await anyio.sleep(1.0)  # three leases: only renewals keep the hold
    admitted, breach = await other.reserve("s", scopes, [Hold(call_id="next", amounts=Amounts(calls=1))])
    assert admitted == []
    assert breach is not None
    await store.aclose()
    await other.aclose()


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A Redis of its own that keeps its data across a restart, as a production one does."""
    with RedisServer(persist=True) as server:
        yield server


async def test_store_closed_refuses_calls_with_a_503_naming_the_store(durable_redis: RedisServer) -> None:
    redis_server = durable_redis
    config = StoreConfig(url=redis_server.url, timeout_s=0.3, prefix="closed")
    sim = simulator()
    client = make(sim, config, budget=Budget(session=Limits(calls=100)))
    with moa_stream.session("outage"):
        await ask(client)
        redis_server.stop()
        try:
            with pytest.raises(openai.InternalServerError) as refused:
                await ask(client)
        finally:
            redis_server.start()
        await ask(client)
    await client.close()
    assert refused.value.status_code == 503
    assert "store at redis://127.0.0.1" in str(refused.value)
    assert sim.stats.requests == 2
    assert moa_stream.session_ledger(client, "outage").totals.calls == 2


async def test_store_open_serves_through_an_outage_and_the_ledger_catches_up(durable_redis: RedisServer) -> None:
    redis_server = durable_redis
    config = StoreConfig(url=redis_server.url, timeout_s=0.3, prefix="open", unavailable="open")
    sim, log = simulator(), EventLog()
    client = make(sim, config, log, budget=Budget(session=Limits(calls=100)))
    with moa_stream.session("outage"):
        await ask(client)
        redis_server.stop()
        try:
            for _ in range(3):
                await ask(client, stream=True)
        finally:
            redis_server.start()
        assert await moa_stream.flush(client)
    await client.close()
    assert sim.stats.requests == 4
    ledger = moa_stream.session_ledger(client, "outage")
    assert ledger.totals.calls == len(log.of(moa_stream.CallUsage)) == 4
    assert ledger.turns == 4


async def test_the_store_refuses_a_layout_it_does_not_know(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).set("moa:format", 2)
    client = make(simulator(), redis_url)
    with pytest.raises(ConfigError, match=r"holds format 2 under 'moa:format'"):
        moa_stream.session_ledger(client, "s")
    await client.close()


async def test_sessions_expire_when_idle_and_the_store_holds_no_credentials(redis_url: str) -> None:
    client = make(simulator(), StoreConfig(url=redis_url, idle_s=3600))
    with moa_stream.session("kept"):
        await ask(client, "moa:duo")
        moa_stream.session_state(client).set("note", "x")
    await client.close()
    raw = redis.Redis.from_url(redis_url)
    session_keys = [key for key in raw.keys("moa:s:kept:*")]
    assert {key.decode().rsplit(":", 1)[1] for key in session_keys} >= {"ledger", "settled", "state"}
    assert all(0 < raw.pttl(key) <= 3600 * 1000 for key in session_keys)
    everything = b" ".join(
        key + b" " + repr(raw.dump(key)).encode() for key in raw.keys("*")
    )  # DUMP: every value's bytes, whatever its type
    assert b"sk-secret-in-the-client" not in everything
    assert b"Bearer" not in everything


def test_a_bad_store_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"store=: field 'url': expected a redis://"):
        moa_stream.wrap(sim_client(simulator()), store="http://localhost:6379")
    with pytest.raises(ConfigError, match=r"field 'lease_s': expected a number of seconds above 0, got 0"):
        moa_stream.wrap(sim_client(simulator()), store=StoreConfig(url="redis://x", lease_s=0))


async def test_a_background_response_finished_through_another_client_is_metered_once_by_its_maker(
    redis_url: str,
) -> None:
    # Behind a load balancer the create and the retrieves land on different replicas.
    sim = Simulator([SimModel(name="slow", ttft_s=0.2, tokens_per_s=200.0)])
    maker_log, other_log = EventLog(), EventLog()
    maker, other = make(sim, redis_url, maker_log), make(sim, redis_url, other_log)
    created = await maker.responses.create(model="slow", input="Tell me about streams", background=True)
    seen = created
    with anyio.fail_after(10):
        while seen.status in ("queued", "in_progress"):
            await anyio.sleep(0.05)
            seen = await other.responses.retrieve(created.id)
    assert seen.usage is not None
    await maker_log.wait_for(lambda log: bool(log.of(moa_stream.TurnEnd)))
    await maker.close()
    await other.close()
    [call] = maker_log.of(moa_stream.CallUsage)
    assert (call.status, call.usage_source, call.output_tokens) == ("completed", "reported", seen.usage.output_tokens)
    assert other_log.of(moa_stream.CallUsage) == []  # the look only handed the body over
    [trace] = maker_log.of(moa_stream.TurnTrace)
    assert trace.calls[0].output.text == seen.output_text
    assert moa_stream.session_ledger(other, call.session_id).totals.calls == 1


def test_a_store_without_the_redis_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what an install without the extra has
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigError, match=r"needs the redis client: pip install 'moa-stream\[redis\]'"):
        moa_stream.wrap(sim_client(simulator()), store="redis://localhost:6379/0")


async def test_a_store_url_given_with_a_store_table_keeps_the_tables_other_fields(tmp_path: Path) -> None:
    config = tmp_path / "moa.toml"
    config.write_text("[store]\nprefix = 'team-a'\nlease_s = 5\n")
    client = moa_stream.wrap(sim_client(simulator()), config=config, store="redis://127.0.0.1:1/0")
    store = _engine_of(client).store
    assert isinstance(store, RedisStore)
    assert (store.config.url, store.config.prefix, store.config.lease_s) == ("redis://127.0.0.1:1/0", "team-a", 5)
    await client.close()
    with pytest.raises(ConfigError, match=r"moa\.toml: \[store\] has no url; give one there, or as store="):
        moa_stream.wrap(sim_client(simulator()), config=config)
    with pytest.raises(ConfigError, match=r"store=: a store is also defined in .*moa\.toml"):
        moa_stream.wrap(sim_client(simulator()), config=config, store=StoreConfig(url="redis://x"))
    config.write_text("[store]\nurl = 'redis://x'\nlease = 5\n")
    with pytest.raises(ConfigError, match=r"field 'store\.lease': unknown key; did you mean 'lease_s'\?"):
        moa_stream.wrap(sim_client(simulator()), config=config)


async def test_a_background_response_left_at_close_is_taken_out_of_the_registry(redis_url: str) -> None:
    sim = Simulator([SimModel(name="stalled", ttft_s=5.0)])
    log = EventLog()
    client = make(sim, redis_url, log)
    created = await client.responses.create(model="stalled", input="hi", background=True)
    assert await moa_stream.flush(client)
    registry = redis.Redis.from_url(redis_url)
    assert registry.exists(f"moa:bg:{created.id}")
    await client.close()
    [call] = log.of(moa_stream.CallUsage)
    assert call.status == "closed_early"
    assert not registry.exists(f"moa:bg:{created.id}")
