"""Replicas of `moa-stream serve` sharing one real Redis: budgets, leases, store outages, the MoA reference
cache and API keys, across real processes, with one simulator upstream in this process counting what
reaches it. Callers are the real `openai.AsyncOpenAI`, spread round-robin over the replicas."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from moa_stream import SESSION_HEADER, BudgetShort, PriceTable, SessionLedger, StoreConfig, Totals
from moa_stream._holds import worst_case
from moa_stream.testing import SimModel, Simulator

from .conftest import ServerThread
from .redis_server import RedisServer
from .replicas import Replicas, callers, ledger_reader, totals_of, usages, wait_until
from .test_server_keys import key_table
from .test_sim import WEATHER_TOOL

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("redis")

USER = [{"role": "user", "content": "Tell me about streams"}]
SETTLE_TIMEOUT = 15.0
"""How long a test waits for settlements and trace lines to land (they are written off the caller's path)."""

# Names not listed answer at once with the simulator's defaults; tests use names of their own, so the
# upstream's per-model counters tell each test's calls apart.
SIM_MODELS = [
    SimModel(name="sim-small", reply_tokens=100),  # priced in the built-in table: the cost limit's model
    SimModel(name="sim-medium"),
    SimModel(name="sim-large"),
    SimModel(name="slow", tokens_per_s=20.0, reply_tokens=2000),  # 100 s long: in flight whenever a test acts
]

COST_MAX_TOKENS = 50
# The hold of one cost-test call, as the replicas compute it: its input estimate plus max_tokens, priced.
COST_HOLD = worst_case(
    "cost", model="sim-small", input_messages=USER, max_output_tokens=COST_MAX_TOKENS, prices=PriceTable.builtin()
).amounts.cost_usd
COST_LIMIT = 7.5 * COST_HOLD

# Only sim-small has a price: the other tests' models cost nothing, so only the calls limit binds them.
SHARED_CONFIG = f"""
[presets.trio]
references = ["ref-a", "ref-b", "ref-c"]
aggregator = "agg"

[budget.session]
calls = 40
cost_usd = {COST_LIMIT!r}
"""

# Three priced references, the most expensive first: the ones that fit are the cheapest.
SHORT_CONFIG = """
[presets.priced]
references = ["sim-large", "sim-small", "sim-medium"]
aggregator = "agg"

[budget.session]
calls = 4
"""

ALICE = "sk-alice-replicas-5d1b"
BOB = "sk-bob-replicas-83c0"
KEYS = key_table("alice", ALICE, "calls = 5") + key_table("bob", BOB)

LEASE_S = 2.0


def store_config(url: str, prefix: str, **fields: Any) -> str:
    """A `[store]` table with the URL in it.

    `serve --store URL` refuses a config that has a `[store]` table too (see
    test_the_store_option_takes_the_other_fields_from_the_store_table), so the replicas that need
    lease_s, unavailable or timeout_s get the URL from the table instead of --store."""
    lines = [f"url = {json.dumps(url)}", f"prefix = {json.dumps(prefix)}"]
    lines += [f"{name} = {json.dumps(value)}" for name, value in fields.items()]
    return "[store]\n" + "\n".join(lines) + "\n"


class Upstream:
    """The simulator served over loopback HTTP on a thread of this process, for every replica."""

    def __init__(self, server: ServerThread, sim: Simulator) -> None:
        self.base_url = server.base_url
        self.sim = sim

    def counter(self) -> Callable[[], collections.Counter[str]]:
        """Requests per model from now on: `seen = upstream.counter()`, later `seen()["model"]`."""
        before = collections.Counter(dict(self.sim.stats.requests_by_model))

        def since() -> collections.Counter[str]:
            now = collections.Counter(dict(self.sim.stats.requests_by_model))
            now.subtract(before)
            return +now

        return since


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    sim = Simulator(SIM_MODELS)
    with ServerThread(sim) as server:
        yield Upstream(server, sim)


@pytest.fixture(scope="module")
def shared(
    upstream: Upstream, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    """Three replicas with `--store URL` (the default prefix), the trio preset and SHARED_CONFIG's
    session limits; tests keep to sessions and model names of their own (and Redis is flushed)."""
    redis_server.ensure_running()
    root = tmp_path_factory.mktemp("shared")
    with Replicas(root, upstream=upstream.base_url, config=SHARED_CONFIG, store=redis_server.url) as replicas:
        yield replicas


@pytest.fixture(scope="module")
def keyed(
    upstream: Upstream, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    """Three replicas with `--keys` (alice with `calls = 5` over all her sessions, bob without limits)."""
    redis_server.ensure_running()
    root = tmp_path_factory.mktemp("keyed")
    with Replicas(root, upstream=upstream.base_url, config="", store=redis_server.url, keys=KEYS) as replicas:
        yield replicas


@pytest.fixture
def start(upstream: Upstream, tmp_path: Path) -> Iterator[Callable[..., Replicas]]:
    """`start(config, store=..., count=...)`: replicas of this test's own, stopped when it ends."""
    with contextlib.ExitStack() as stack:
        clusters = 0

        def started(config: str, *, store: str | None = None, count: int = 3) -> Replicas:
            nonlocal clusters
            clusters += 1
            root = tmp_path / f"cluster-{clusters}"
            return stack.enter_context(
                Replicas(root, upstream=upstream.base_url, config=config, store=store, count=count)
            )

        yield started


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, to take away and bring back: restarting the session's would leave the
    module's replicas with stale connections, and each test should only see its own outage."""
    with RedisServer() as server:
        yield server


async def ask(client: openai.AsyncOpenAI, model: str, *, session: str, **options: Any) -> Any:
    return await client.chat.completions.create(
        model=model, messages=USER, extra_headers={SESSION_HEADER: session}, **options
    )


async def served_or_refused(client: openai.AsyncOpenAI, model: str, *, session: str) -> Any:
    """The answer, or the status error it was refused with."""
    try:
        return await ask(client, model, session=session)
    except openai.APIStatusError as error:
        return error


def sorted_outcomes(outcomes: list[Any]) -> tuple[list[Any], list[openai.BadRequestError], collections.Counter[str]]:
    """The answers, the 400 refusals, and a count of every kind of outcome (for failure messages)."""
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, openai.BadRequestError)]
    kinds = collections.Counter(
        "served" if not isinstance(o, BaseException) else f"{type(o).__name__} {getattr(o, 'code', '')}: {o}"[:300]
        for o in outcomes
    )
    return served, refused, kinds


def comparable(totals: Totals) -> tuple[Any, ...]:
    """Totals to compare: the ledger adds costs in Redis, as decimal strings, so the last bits may differ."""
    return (
        *(getattr(totals, name) for name in Totals.__struct_fields__ if name != "cost_usd"),
        round(totals.cost_usd, 12),
    )


def is_budget_refusal(error: openai.BadRequestError) -> bool:
    return error.code == "budget_exceeded"


async def stored_and_traced(
    ledger: Callable[[str], SessionLedger], replicas: Replicas, session: str, *, calls: int
) -> tuple[int, tuple[Any, ...], tuple[Any, ...]]:
    """Once the replicas' trace files hold `calls` calls of `session` (lines are written off the
    caller's path): how many they hold, the ledger's totals as soon as they agree with the traced
    calls' totals (or when time runs out), and the traced calls' totals."""
    traced = await wait_until(
        lambda: usages(replicas.traces(session)), lambda found: len(found) >= calls, timeout=SETTLE_TIMEOUT
    )
    expected = comparable(totals_of(traced))
    stored = await wait_until(
        lambda: comparable(ledger(session).totals), lambda found: found == expected, timeout=SETTLE_TIMEOUT
    )
    return len(traced), stored, expected


# -- budgets under concurrency ------------------------------------------------------------------------


async def test_a_session_call_limit_admits_exactly_that_many_calls_across_replicas(
    shared: Replicas, upstream: Upstream, redis_url: str
) -> None:
    seen = upstream.counter()
    async with callers(shared) as clients:
        outcomes = await asyncio.gather(
            *(ask(clients[i % 3], "crowd", session="crowd") for i in range(150)), return_exceptions=True
        )
    served, refused, kinds = sorted_outcomes(outcomes)
    assert (len(served), len(refused)) == (40, 110), kinds
    assert all(is_budget_refusal(error) for error in refused)
    assert seen()["crowd"] == 40
    async with ledger_reader(StoreConfig(url=redis_url)) as ledger:
        final = await wait_until(
            lambda: ledger("crowd"), lambda ledger: ledger.totals.calls >= 40, timeout=SETTLE_TIMEOUT
        )
    assert final.totals.calls == 40


async def test_a_session_cost_limit_is_passed_by_at_most_one_hold_across_replicas(
    shared: Replicas, upstream: Upstream, redis_url: str
) -> None:
    seen = upstream.counter()
    async with callers(shared) as clients:
        outcomes = await asyncio.gather(
            *(ask(clients[i % 3], "sim-small", session="spend", max_tokens=COST_MAX_TOKENS) for i in range(60)),
            return_exceptions=True,
        )
    served, refused, kinds = sorted_outcomes(outcomes)
    assert len(served) + len(refused) == 60, kinds
    assert refused, "the cost limit never refused a call"
    assert all(is_budget_refusal(error) and error.body["limit"] == "cost_usd" for error in refused)  # type: ignore[index]
    # A call is refused only once what is settled and held reaches the limit, and no call costs more than its hold.
    assert len(served) >= math.ceil(COST_LIMIT / COST_HOLD)
    assert seen()["sim-small"] == len(served)
    async with ledger_reader(StoreConfig(url=redis_url)) as ledger:
        final = await wait_until(
            lambda: ledger("spend"), lambda ledger: ledger.totals.calls >= len(served), timeout=SETTLE_TIMEOUT
        )
    assert final.totals.calls == len(served)
    assert final.totals.cost_usd <= COST_LIMIT + COST_HOLD


async def test_a_moa_turn_short_of_budget_runs_the_cheapest_references_that_fit(
    start: Callable[..., Replicas], upstream: Upstream, redis_url: str
) -> None:
    replicas = start(SHORT_CONFIG, store=redis_url)
    seen = upstream.counter()
    async with callers(replicas) as clients:
        await ask(clients[0], "spent-elsewhere", session="short")  # one of the four calls, on another replica
        answer = await ask(clients[1], "moa:priced", session="short")
    assert answer.choices[0].message.content
    assert seen() == {"spent-elsewhere": 1, "sim-small": 1, "sim-medium": 1, "agg": 1}
    traces = await wait_until(
        lambda: replicas[1].traces("short"), lambda found: len(found) >= 1, timeout=SETTLE_TIMEOUT
    )
    [trace] = traces
    assert trace.budget_short == [
        BudgetShort(policy="fewer_references", layer=1, left_out=["sim-large"], limit="session.calls")
    ]
    assert sorted(call.model for call in trace.calls) == ["agg", "sim-medium", "sim-small"]


async def test_a_budget_refusal_reaches_the_caller_with_the_x_moa_error_header(
    shared: Replicas, upstream: Upstream, redis_url: str
) -> None:
    # The header marks a refusal of the library's own, as the library sends it (moa_stream._budget.BUDGET_HEADER).
    seen = upstream.counter()
    async with callers(shared) as clients:
        for i in range(40):
            await ask(clients[i % 3], "marked", session="marked")
        with pytest.raises(openai.BadRequestError) as refused:
            await ask(clients[1], "marked", session="marked")
    assert refused.value.code == "budget_exceeded"
    assert seen()["marked"] == 40
    assert refused.value.response.headers.get("x-moa-error") == "budget_exceeded"


# -- a replica that crashes ---------------------------------------------------------------------------


async def test_a_killed_replicas_hold_counts_until_its_lease_expires(
    start: Callable[..., Replicas], upstream: Upstream, redis_url: str
) -> None:
    config = store_config(redis_url, "lease", lease_s=LEASE_S) + "[budget.session]\ncalls = 3\n"
    replicas = start(config)
    victim = replicas[2]
    seen = upstream.counter()
    async with callers(replicas) as clients, ledger_reader(StoreConfig(url=redis_url, prefix="lease")) as ledger:
        await ask(clients[2], "quick", session="lease")
        await ask(clients[0], "quick", session="lease")
        # The last of the three calls: in flight on the victim, its hold taken, when the victim dies.
        stream = await ask(clients[2], "slow", session="lease", stream=True)
        await stream.__anext__()
        # What the victim finished is in its trace file and settled in the store before the crash.
        lines = await wait_until(lambda: victim.traces("lease"), lambda found: len(found) == 1, timeout=SETTLE_TIMEOUT)
        assert len(lines) == 1
        settled = await wait_until(
            lambda: ledger("lease").totals.calls, lambda calls: calls == 2, timeout=SETTLE_TIMEOUT
        )
        assert settled == 2

        victim.kill()
        killed_at = time.monotonic()
        await stream.close()
        with pytest.raises(openai.BadRequestError) as refused:
            await ask(clients[0], "quick", session="lease")
        assert is_budget_refusal(refused.value)
        assert refused.value.body["spent"] == 3  # type: ignore[index]  # two settled, one held by the dead replica
        assert time.monotonic() - killed_at < LEASE_S

        survivors = itertools.cycle(clients[:2])
        answer = await wait_until(
            lambda: served_or_refused(next(survivors), "quick", session="lease"),
            lambda outcome: not isinstance(outcome, openai.APIStatusError),
            timeout=LEASE_S + 5,
            every=0.1,
        )
        assert not isinstance(answer, openai.APIStatusError), f"still refused {LEASE_S + 5}s after the kill: {answer}"
        # The hold was renewed until the kill, so it expired at most one lease after it.
        assert time.monotonic() - killed_at < LEASE_S + 2

        # Two calls before the crash (one in the victim's trace file), one after the lease; none for
        # the call that died with the victim, in the trace files or in the ledger.
        traced, stored, expected = await stored_and_traced(ledger, replicas, "lease", calls=3)
    assert traced == 3
    assert stored == expected
    assert seen()["slow"] == 1


# -- the store going away -----------------------------------------------------------------------------


async def test_a_store_outage_refuses_calls_with_a_503_naming_the_store_when_closed(
    own_redis: RedisServer, start: Callable[..., Replicas], upstream: Upstream
) -> None:
    config = store_config(own_redis.url, "closed", unavailable="closed", timeout_s=0.5)
    replicas = start(config + "[budget.session]\ncalls = 100\n")
    seen = upstream.counter()
    async with callers(replicas) as clients:
        for client in clients:
            await ask(client, "before", session="warm-up")
        own_redis.stop()
        try:
            for client in clients:
                with pytest.raises(openai.InternalServerError) as refused:
                    await ask(client, "during", session="outage")
                assert refused.value.status_code == 503
                assert refused.value.code == "store_unavailable"
                assert own_redis.url in refused.value.body["message"]  # type: ignore[index]
        finally:
            own_redis.start()
        for client in clients:
            # Bounded retries: a pooled connection the outage left stale can still fail a call once the
            # store is back (test_after_the_store_restarts_replicas_that_missed_the_outage_serve_their_calls).
            answer = await wait_until(
                lambda client=client: served_or_refused(client, "after", session="outage"),
                lambda outcome: not isinstance(outcome, openai.APIStatusError),
                timeout=SETTLE_TIMEOUT,
            )
            assert not isinstance(answer, openai.APIStatusError), answer
    assert seen() == {"before": 3, "after": 3}
    async with ledger_reader(StoreConfig(url=own_redis.url, prefix="closed")) as ledger:
        traced, stored, expected = await stored_and_traced(ledger, replicas, "outage", calls=3)
    assert traced == 3  # the three after the outage; the refused ones never started
    assert stored == expected


async def test_a_store_outage_serves_calls_and_settles_them_once_it_is_back_when_open(
    own_redis: RedisServer, start: Callable[..., Replicas], upstream: Upstream
) -> None:
    config = store_config(own_redis.url, "open", unavailable="open", timeout_s=0.5)
    replicas = start(config + "[budget.session]\ncalls = 100\n")
    seen = upstream.counter()
    async with callers(replicas) as clients:
        for client in clients:
            await ask(client, "before", session="warm-up")
        own_redis.stop()
        try:
            for client in clients:
                answer = await ask(client, "during", session="outage")
                assert answer.choices[0].message.content
            # Their trace lines are out while their settlements wait in the replicas' outboxes.
            lines = await wait_until(
                lambda: replicas.traces("outage"), lambda found: len(found) >= 3, timeout=SETTLE_TIMEOUT
            )
            assert len(lines) == 3
        finally:
            own_redis.start()
    assert seen() == {"before": 3, "during": 3}
    async with ledger_reader(StoreConfig(url=own_redis.url, prefix="open")) as ledger:
        traced, stored, expected = await stored_and_traced(ledger, replicas, "outage", calls=3)
    assert traced == 3
    assert stored == expected  # nothing served during the outage is missing from the ledger


async def test_after_the_store_restarts_replicas_that_missed_the_outage_serve_their_calls(
    own_redis: RedisServer, start: Callable[..., Replicas], upstream: Upstream
) -> None:
    config = store_config(own_redis.url, "restart", unavailable="closed", timeout_s=0.5)
    replicas = start(config + "[budget.session]\ncalls = 1000\n")
    async with callers(replicas) as clients:
        # Concurrent calls leave each replica with several pooled connections to the store.
        warm = await asyncio.gather(*(ask(clients[i % 3], "warm", session=f"warm-{i}") for i in range(60)))
        assert len(warm) == 60
        # Restarted while no call runs: the replicas never see it go, only their connections are stale.
        own_redis.stop()
        own_redis.start()
        outcomes = await asyncio.gather(
            *(ask(clients[i % 3], "back", session=f"back-{i}") for i in range(60)), return_exceptions=True
        )
    served, _, kinds = sorted_outcomes(outcomes)
    assert len(served) == 60, kinds


# -- the reference cache ------------------------------------------------------------------------------


async def test_a_tool_loop_reuses_the_references_when_its_calls_land_on_different_replicas(
    shared: Replicas, upstream: Upstream, redis_url: str
) -> None:
    seen = upstream.counter()
    headers = {SESSION_HEADER: "loop"}
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    async with callers(shared) as clients:
        first = await clients[0].chat.completions.create(
            model="moa:trio", messages=messages, tools=[WEATHER_TOOL], extra_headers=headers
        )
        [tool_call] = first.choices[0].message.tool_calls or []
        messages += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps({"forecast": "sunny"})},
        ]
        second = await clients[1].chat.completions.create(
            model="moa:trio", messages=messages, tools=[WEATHER_TOOL], extra_headers=headers
        )
    assert second.choices[0].message.content
    [miss] = await wait_until(lambda: shared[0].traces("loop"), lambda found: len(found) >= 1, timeout=SETTLE_TIMEOUT)
    [hit] = await wait_until(lambda: shared[1].traces("loop"), lambda found: len(found) >= 1, timeout=SETTLE_TIMEOUT)
    assert (miss.cadence, hit.cadence) == ("miss", "hit")
    assert [call.role for call in hit.calls] == ["aggregator"]
    assert seen() == {"ref-a": 1, "ref-b": 1, "ref-c": 1, "agg": 2}


# -- API keys -----------------------------------------------------------------------------------------


async def test_two_keys_sending_the_same_session_id_get_sessions_of_their_own(keyed: Replicas, redis_url: str) -> None:
    async with callers(keyed, ALICE) as alice, callers(keyed, BOB) as bob:
        await ask(alice[0], "whose", session="s1")
        await ask(bob[1], "whose", session="s1")
        await ask(bob[2], "whose", session="s1")
    alice_traces = await wait_until(
        lambda: keyed.traces("alice.s1"), lambda found: len(found) >= 1, timeout=SETTLE_TIMEOUT
    )
    bob_traces = await wait_until(lambda: keyed.traces("bob.s1"), lambda found: len(found) >= 2, timeout=SETTLE_TIMEOUT)
    assert [trace.session_id for trace in alice_traces] == ["alice.s1"]
    assert [trace.session_id for trace in bob_traces] == ["bob.s1", "bob.s1"]
    assert keyed.traces("s1") == []
    async with ledger_reader(StoreConfig(url=redis_url)) as ledger:
        calls = await wait_until(
            lambda: (ledger("alice.s1").totals.calls, ledger("bob.s1").totals.calls, ledger("s1").totals.calls),
            lambda found: found == (1, 2, 0),
            timeout=SETTLE_TIMEOUT,
        )
    assert calls == (1, 2, 0)


async def test_a_keys_budget_holds_across_replicas_when_it_rotates_session_ids(
    keyed: Replicas, upstream: Upstream, redis_url: str
) -> None:
    seen = upstream.counter()
    async with callers(keyed, ALICE) as alice:
        outcomes = await asyncio.gather(
            *(ask(alice[i % 3], "alice-only", session=f"rotated-{i}") for i in range(15)), return_exceptions=True
        )
    served, refused, kinds = sorted_outcomes(outcomes)
    assert (len(served), len(refused)) == (5, 10), kinds
    assert all(is_budget_refusal(error) for error in refused)
    assert {(e.body["scope"], e.body["key_id"]) for e in refused} == {("key", "alice")}  # type: ignore[index]
    assert seen()["alice-only"] == 5


# -- the command line ---------------------------------------------------------------------------------


async def test_the_store_option_takes_the_other_fields_from_the_store_table(
    start: Callable[..., Replicas], redis_url: str
) -> None:
    # --store names the Redis; lease_s, prefix and the rest come from the [store] table of --config.
    config = store_config("redis://127.0.0.1:1/0", "from-table", lease_s=LEASE_S)
    [replica] = start(config, store=redis_url, count=1)
    async with callers([replica]) as [client]:
        await ask(client, "tabled", session="table")
    async with ledger_reader(StoreConfig(url=redis_url, prefix="from-table")) as ledger:
        calls = await wait_until(lambda: ledger("table").totals.calls, lambda calls: calls == 1, timeout=SETTLE_TIMEOUT)
    assert calls == 1
