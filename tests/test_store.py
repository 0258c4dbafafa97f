"""The store's contract, the same cases on both stores: in memory (the embedded default) and on a
real Redis server. Ledger totals, state, reserve-then-settle budgets, per-session and per-key
limits, idempotent settlement; then what only a shared store does (leases, other clients)."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import openai
import pytest

import moa_stream
from moa_stream import Budget, Limits, Preset
from moa_stream._session import KEY_HEADER
from moa_stream._wrap import _engine_of
from moa_stream.testing import SimModel, Simulator, sim_client

from .conftest import EventLog, tool_loop
from .conftest import chat_once as ask

MODELS = ("ref-a", "ref-b", "ref-c", "agg", "sim-small")
PRICES = {name: {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6} for name in MODELS}
PRESETS = {"trio": Preset(references=["ref-a", "ref-b", "ref-c"], aggregator="agg")}


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str | None:
    """None for the embedded store, else the URL of a running, empty Redis."""
    return None if request.param == "memory" else request.getfixturevalue("redis_url")


def simulator() -> Simulator:
    return Simulator([SimModel(name=name) for name in MODELS])


def make(sim: Simulator, store: str | None, log: EventLog | None = None, **options: Any) -> openai.AsyncOpenAI:
    return moa_stream.wrap(
        sim_client(sim, max_retries=0),
        sinks=[log] if log is not None else [],
        store=store,
        prices=PRICES,
        presets=PRESETS,
        **options,
    )


async def test_the_ledger_adds_up_by_model_and_role(store: str | None) -> None:
    sim, log = simulator(), EventLog()
    client = make(sim, store, log)
    with moa_stream.session("ledger"):
        await ask(client, "moa:trio", stream=True)
        await ask(client, "sim-small")
    await client.close()
    ledger = moa_stream.session_ledger(client, "ledger")
    calls = log.of(moa_stream.CallUsage)
    assert ledger.turns == 2
    assert ledger.totals.calls == len(calls) == 5
    assert ledger.totals.output_tokens == sum(c.output_tokens or 0 for c in calls)
    assert ledger.totals.cost_usd == pytest.approx(sum(c.cost_usd or 0 for c in calls))
    assert {role: t.calls for role, t in ledger.by_role.items()} == {"reference": 3, "aggregator": 1, "direct": 1}
    assert set(ledger.by_model) == set(MODELS)
    assert ledger.by_model["agg"].input_tokens == next(c.input_tokens for c in calls if c.model == "agg")


async def test_session_state_round_trips_and_refuses_what_json_cannot_hold(store: str | None) -> None:
    client = make(simulator(), store)
    state = moa_stream.session_state(client, "state")
    state.set("plan", ("a", {"b": 1.5}))
    state.set("gone", 1)
    state.delete("gone")
    with pytest.raises(TypeError, match=r"session state 'bad': a set is not JSON"):
        state.set("bad", {1, 2})
    assert state.items() == {"plan": ["a", {"b": 1.5}]}
    assert moa_stream.session_state(client, "other").items() == {}
    await client.close()


async def test_concurrent_calls_pass_a_call_limit_exactly_up_to_it(store: str | None) -> None:
    sim = simulator()
    client = make(sim, store, budget=Budget(session=Limits(calls=5)))
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await ask(client, stream=True)
            outcomes.append("sent")
        except moa_stream.BudgetExceeded:
            outcomes.append("refused")

    with moa_stream.session("burst"):
        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(one)
    await client.close()
    assert outcomes.count("sent") == sim.stats.requests == 5
    assert moa_stream.session_ledger(client, "burst").totals.calls == 5


async def test_a_cost_limit_under_concurrency_is_passed_by_at_most_one_hold(store: str | None) -> None:
    sim = simulator()
    limit = 0.005
    client = make(sim, store, budget=Budget(session=Limits(cost_usd=limit)))
    # One call's hold: its input estimate plus max_tokens, at 2e-6 per output token.
    hold = 200 * 2e-6 + 50 * 1e-6

    async def one() -> None:
        with contextlib.suppress(moa_stream.BudgetExceeded):
            await client.chat.completions.create(
                model="sim-small", messages=[{"role": "user", "content": "hi"}], max_tokens=200
            )

    with moa_stream.session("spend"):
        for _ in range(200):  # waves of concurrent calls until what was spent reaches the limit
            async with anyio.create_task_group() as group:
                for _ in range(10):
                    group.start_soon(one)
            assert await moa_stream.flush(client)  # settled in the store too
            if moa_stream.session_ledger(client, "spend").totals.cost_usd >= limit:
                break
    await client.close()
    spent = moa_stream.session_ledger(client, "spend").totals.cost_usd
    assert limit <= spent <= limit + hold


async def test_a_session_budget_replaces_the_clients_for_that_session_only(store: str | None) -> None:
    sim = simulator()
    client = make(sim, store, budget=Budget(session=Limits(calls=3)))
    moa_stream.set_session_budget(client, "vip", Budget(session=Limits(calls=5)))
    for session_id, allowed in (("vip", 5), ("plain", 3)):
        with moa_stream.session(session_id):
            for _ in range(allowed):
                await ask(client)
            with pytest.raises(moa_stream.BudgetExceeded, match=f"session '{session_id}'"):
                await ask(client)
    await client.close()
    assert sim.stats.requests == 8


async def test_a_key_limit_covers_all_of_the_keys_sessions(store: str | None) -> None:
    sim = simulator()
    client = make(sim, store, budget=Budget())  # no limit of its own: its refusals raise BudgetExceeded
    _engine_of(client).set_key_limits("alice", Limits(calls=3))
    alice = client.with_options(default_headers={KEY_HEADER: "alice"})
    for number in range(3):
        with moa_stream.session(f"alice.rotated-{number}"):
            await ask(alice)
    with moa_stream.session("alice.rotated-9"), pytest.raises(moa_stream.BudgetExceeded) as refused:
        await ask(alice)
    assert (refused.value.scope, refused.value.limit) == ("key", "calls")
    assert "API key 'alice'" in str(refused.value)
    with moa_stream.session("bob.s1"):
        await ask(client.with_options(default_headers={KEY_HEADER: "bob"}))  # another key: its own limit
    await client.close()
    assert sim.stats.requests == 4


async def test_a_second_settlement_of_a_call_changes_nothing(store: str | None) -> None:
    client = make(simulator(), store)
    log = EventLog()
    moa_stream.add_sink(client, log)
    with moa_stream.session("twice"):
        await ask(client)
    assert await moa_stream.flush(client)
    [usage] = log.of(moa_stream.CallUsage)
    engine = _engine_of(client)
    settled: list[object] = []
    engine.store.settle(usage, None, settled.append)
    await client.close()
    assert moa_stream.session_ledger(client, "twice").totals.calls == 1
    assert settled == [None]


async def test_the_reference_cache_serves_a_tool_loop(store: str | None) -> None:
    log = EventLog()
    client = make(simulator(), store, log)
    question, loop = tool_loop()
    with moa_stream.session("loop"):
        await client.chat.completions.create(model="moa:trio", messages=question)  # type: ignore[arg-type]
        await client.chat.completions.create(model="moa:trio", messages=loop)  # type: ignore[arg-type]
    await client.close()
    assert [trace.cadence for trace in log.of(moa_stream.TurnTrace)] == ["miss", "hit"]
