"""Budgets: hard limits refuse a call before any request leaves, soft limits warn once, in Python and
in moa.toml, per session and per turn, including in the middle of a MoA fan-out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

import moa_stream
from moa_stream import Budget, ConfigError, Limits, Preset
from moa_stream.testing import SimModel, Simulator, sim_client

from .conftest import EventLog
from .conftest import chat_once as ask

USER = [{"role": "user", "content": "Tell me about streams"}]


def simulator() -> Simulator:
    return Simulator([SimModel(name=n) for n in ("ref-a", "ref-b", "ref-c", "agg", "sim-small", "unpriced")])


def make(sim: Simulator, log: EventLog, budget: Budget, **options: Any) -> openai.AsyncOpenAI:
    return moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[log], budget=budget, **options)


async def test_a_session_call_limit_refuses_the_next_call_before_it_is_sent() -> None:
    sim, log = simulator(), EventLog()
    client = make(sim, log, Budget(session=Limits(calls=2)))
    with moa_stream.session("capped"):
        await ask(client)
        await ask(client, stream=True)
        for attempt in (client, client.with_options(timeout=5), client.copy()):
            with pytest.raises(moa_stream.BudgetExceeded) as refused:
                await ask(attempt, stream=True)
            assert isinstance(refused.value, openai.BadRequestError)
            assert (refused.value.scope, refused.value.limit, refused.value.spent) == ("session", "calls", 2)
            assert refused.value.session_id == "capped"
            assert "session.calls is 2 calls and 2 calls were started in session 'capped'" in str(refused.value)
    await client.close()
    assert sim.stats.requests == 2  # nothing left for the refused calls
    assert len(log.of(moa_stream.CallUsage)) == 2
    refused_turns = [t for t in log.of(moa_stream.TurnEnd) if t.error]
    assert [(t.calls, t.status) for t in refused_turns] == [(0, "error")] * 3
    assert "budget exceeded" in (refused_turns[0].error or "")


async def test_a_session_cost_limit_counts_what_was_spent_across_calls() -> None:
    sim, log = simulator(), EventLog()
    prices = {"sim-small": {"input_cost_per_token": 1e-3, "output_cost_per_token": 1e-3}}
    client = make(sim, log, Budget(session=Limits(cost_usd=0.05)), prices=prices)
    with moa_stream.session("spender"):
        spent = 0.0
        with pytest.raises(moa_stream.BudgetExceeded) as refused:
            for _ in range(10):
                await ask(client)
                spent = moa_stream.session_ledger(client).totals.cost_usd
    await client.close()
    assert spent >= 0.05
    assert refused.value.spent == pytest.approx(spent)
    assert refused.value.limit == "cost_usd"
    assert sim.stats.requests == len(log.of(moa_stream.CallUsage))


async def test_a_turn_limit_too_small_for_the_preset_runs_the_references_that_fit() -> None:
    sim, log = simulator(), EventLog()
    preset = Preset(references=["ref-a", "ref-b", "ref-c"], aggregator="agg")
    client = make(sim, log, Budget(turn=Limits(calls=2)), presets={"trio": preset})
    with moa_stream.session("fan"):
        answer = await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    await client.close()
    assert answer.choices[0].message.content
    assert sim.stats.requests_by_model == {"ref-a": 1, "agg": 1}  # the aggregator's hold comes first
    [warning] = log.of(moa_stream.BudgetWarning)
    assert (warning.kind, warning.scope, warning.limit) == ("budget_short", "turn", "calls")
    assert "left out: ref-b, ref-c" in warning.message
    [trace] = log.of(moa_stream.TurnTrace)
    assert trace.budget_short == [
        moa_stream.BudgetShort(policy="fewer_references", layer=1, left_out=["ref-b", "ref-c"], limit="turn.calls")
    ]
    assert [record.label for record in trace.calls] == ["ref-a", "agg"]
    assert trace.end.status == "completed"


async def test_fewer_references_leaves_out_the_most_expensive_first() -> None:
    sim, log = simulator(), EventLog()
    prices = {
        "ref-a": {"input_cost_per_token": 1e-3, "output_cost_per_token": 1e-3},
        "ref-b": {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6},
        "ref-c": {"input_cost_per_token": 1e-5, "output_cost_per_token": 1e-5},
        "agg": {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6},
    }
    preset = Preset(references=["ref-a", "ref-b", "ref-c"], aggregator="agg")
    client = make(sim, log, Budget(turn=Limits(calls=3)), presets={"trio": preset}, prices=prices)
    await ask(client, "moa:trio")
    await client.close()
    assert sim.stats.requests_by_model == {"ref-b": 1, "ref-c": 1, "agg": 1}
    [trace] = log.of(moa_stream.TurnTrace)
    assert trace.budget_short[0].left_out == ["ref-a"]


async def test_aggregator_alone_runs_no_reference_when_the_preset_does_not_fit() -> None:
    sim, log = simulator(), EventLog()
    preset = Preset(references=["ref-a", "ref-b", "ref-c"], aggregator="agg", on_budget_short="aggregator_alone")
    client = make(sim, log, Budget(turn=Limits(calls=3)), presets={"trio": preset})
    await ask(client, "moa:trio")
    await client.close()
    assert sim.stats.requests_by_model == {"agg": 1}
    [trace] = log.of(moa_stream.TurnTrace)
    assert trace.budget_short[0].left_out == ["ref-a", "ref-b", "ref-c"]
    assert trace.budget_short[0].policy == "aggregator_alone"


async def test_refuse_sends_nothing_when_the_preset_does_not_fit() -> None:
    sim, log = simulator(), EventLog()
    preset = Preset(references=["ref-a", "ref-b", "ref-c"], aggregator="agg", on_budget_short="refuse")
    client = make(sim, log, Budget(session=Limits(calls=3)), presets={"trio": preset})
    with moa_stream.session("strict"), pytest.raises(moa_stream.BudgetExceeded) as refused:
        await ask(client, "moa:trio", stream=True)
    await client.close()
    assert (refused.value.scope, refused.value.limit) == ("session", "calls")
    assert sim.stats.requests == 0  # nothing spent on references the aggregator could not use
    assert log.of(moa_stream.CallUsage) == []
    [end] = log.of(moa_stream.TurnEnd)
    assert (end.calls, end.status) == (0, "error")
    assert "session.calls is 3 calls" in (end.error or "")


@pytest.mark.parametrize("policy", ["aggregator_alone", "error"])
async def test_a_token_limit_that_holds_only_the_aggregator_runs_it_alone_then_refuses(policy: str) -> None:
    # Holds weigh a call's worst case (input estimate plus max_tokens, else 4096 output tokens):
    # the aggregator's hold alone reaches an output limit of 1, so no reference fits beside it.
    sim, log = simulator(), EventLog()
    preset = Preset(layers=[["ref-a", "ref-b"], ["ref-c"]], aggregator="agg", on_all_failed=policy)  # type: ignore[arg-type]
    client = make(sim, log, Budget(session=Limits(output_tokens=1)), presets={"deep": preset})
    with moa_stream.session("deep"):
        await ask(client, "moa:deep")
        with pytest.raises(moa_stream.BudgetExceeded) as refused:
            await ask(client, "moa:deep")
    await client.close()
    assert sim.stats.requests_by_model == {"agg": 1}  # overshoot: at most the one call a hold let through
    assert refused.value.limit == "output_tokens"
    assert refused.value.spent == sum(c.output_tokens or 0 for c in log.of(moa_stream.CallUsage)) > 1


async def test_soft_limits_warn_once_per_crossing_per_session_and_per_turn() -> None:
    sim, log = simulator(), EventLog()
    preset = Preset(references=["ref-a", "ref-b", "ref-c"], aggregator="agg", cadence="per_call")
    budget = Budget(session_soft=Limits(calls=5), turn_soft=Limits(calls=2))
    client = make(sim, log, budget, presets={"trio": preset})
    with moa_stream.session("soft"):
        for _ in range(3):
            await ask(client, "moa:trio", stream=True)  # 4 calls each: never refused
    await client.close()
    await log.wait_turns(3)
    warnings = log.of(moa_stream.BudgetWarning)
    assert sorted((w.scope, w.limit, w.threshold) for w in warnings) == [
        ("session", "calls", 5),
        ("turn", "calls", 2),
        ("turn", "calls", 2),
        ("turn", "calls", 2),
    ]
    assert len({w.turn_id for w in warnings if w.scope == "turn"}) == 3
    [session_warning] = [w for w in warnings if w.scope == "session"]
    assert session_warning.spent == 5
    assert "soft limit session_soft.calls = 5" in session_warning.message


async def test_an_unknown_price_under_a_cost_limit_warns_that_it_cannot_be_enforced_exactly() -> None:
    sim, log = simulator(), EventLog()
    client = make(sim, log, Budget(session=Limits(cost_usd=1.0)))
    with moa_stream.session("unpriced"):
        for _ in range(3):
            await ask(client, "unpriced")
        ledger = moa_stream.session_ledger(client)
    await client.close()
    assert (ledger.totals.unpriced_calls, ledger.totals.cost_complete, ledger.totals.cost_usd) == (3, False, 0.0)
    [warning] = log.of(moa_stream.BudgetWarning)
    assert warning.kind == "cost_unknown"
    assert "'unpriced' is unknown" in warning.message


async def test_no_budget_changes_nothing() -> None:
    sim, log = simulator(), EventLog()
    client = moa_stream.wrap(sim_client(sim), sinks=[log])
    for _ in range(5):
        await ask(client, "unpriced")
    await client.close()
    assert not log.of(moa_stream.BudgetWarning)
    assert "_make_status_error" not in vars(client)  # the client is left exactly as wrap() always made it


async def test_a_budget_from_moa_toml(tmp_path: Path) -> None:
    config = tmp_path / "moa.toml"
    config.write_text(
        "[presets.duo]\nreferences = ['ref-a', 'ref-b']\naggregator = 'agg'\non_budget_short = 'refuse'\n\n"
        "[budget.turn]\ncalls = 2\n\n[budget.session_soft]\ncost_usd = 0.5\n"
    )
    assert moa_stream.load_budget(config) == Budget(turn=Limits(calls=2), session_soft=Limits(cost_usd=0.5))
    sim, log = simulator(), EventLog()
    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[log], config=config)
    with pytest.raises(moa_stream.BudgetExceeded, match=r"turn limit turn\.calls is 2 calls"):
        await ask(client, "moa:duo")
    await client.close()
    assert sim.stats.requests == 0  # refused before the fan-out: nothing spent on references


BAD_TOML = [
    ("[budget.sesion]\ncalls = 1\n", "field 'budget.sesion': unknown key; did you mean 'session'?"),
    ("[budget.session]\ncals = 1\n", "field 'budget.session.cals': unknown key; did you mean 'calls'?"),
    ("[budget.session]\ncalls = 0\n", "field 'session.calls': must be a finite number above 0, got 0"),
    ("[budget.turn]\ncalls = 1.5\n", "field 'turn.calls': expected a positive integer, got 1.5"),
    ("[budget.turn]\ncost_usd = 'cheap'\n", "field 'turn.cost_usd': expected a positive number, got 'cheap'"),
    ("[budget.turn]\ncost_usd = true\n", "field 'turn.cost_usd': expected a positive number, got True"),
    ("[budget]\nsession = 5\n", "field 'budget.session': expected a table of limits, got 5"),
    ("budget = 5\n", "'budget' must be a table"),
    (
        "[budget.session]\ncalls = 5\n[budget.session_soft]\ncalls = 6\n",
        "field 'session_soft.calls': 6 is above the hard limit session.calls = 5",
    ),
    ("[budgets]\n", "top-level key 'budgets': unknown key; did you mean 'budget'?"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_TOML)
def test_bad_budget_config_names_the_file_field_and_value(tmp_path: Path, text: str, problem: str) -> None:
    config = tmp_path / "moa.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        moa_stream.load_budget(config)
    assert str(config) in str(error.value)
    assert problem in str(error.value)


@pytest.mark.parametrize(
    ("budget", "problem"),
    [
        (Budget(session=Limits(cost_usd=-1.0)), "field 'session.cost_usd': must be a finite number above 0, got -1.0"),
        (Budget(turn=Limits(input_tokens=float("inf"))), "field 'turn.input_tokens': expected a positive integer"),  # type: ignore[arg-type]
        (Budget(turn=5), "field 'turn': expected a moa_stream.Limits, got int"),  # type: ignore[arg-type]
        ({"session": {}}, "expected a moa_stream.Budget, got dict"),
    ],
)
def test_bad_budget_in_python_is_refused_at_wrap(budget: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match=r"^budget=: ") as error:
        moa_stream.wrap(sim_client(simulator()), budget=budget)
    assert problem in str(error.value)


def test_a_budget_given_twice_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "moa.toml"
    config.write_text("[budget.turn]\ncalls = 2\n")
    with pytest.raises(ConfigError, match=r"a budget is also defined in .*moa\.toml"):
        moa_stream.wrap(sim_client(simulator()), budget=Budget(), config=config)


async def test_calls_in_flight_count_against_a_session_call_limit() -> None:
    # Eight calls start at once: each admission must count the ones already in flight.
    sim, log = simulator(), EventLog()
    client = make(sim, log, Budget(session=Limits(calls=2)))
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await ask(client, stream=True)
            outcomes.append("sent")
        except moa_stream.BudgetExceeded as refused:
            outcomes.append("refused" if "2 calls were started" in str(refused) else str(refused))

    with moa_stream.session("burst"):
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(one)
    await client.close()
    assert sorted(outcomes) == ["refused"] * 6 + ["sent"] * 2
    assert sim.stats.requests == 2
