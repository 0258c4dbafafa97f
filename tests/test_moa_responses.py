"""MoA presets served through the Responses API: references from the Responses input, the aggregator
native or bridged from chat completions, conversations continued by previous_response_id."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import openai
import pytest
from openai.types.responses import FunctionToolParam

import moa_stream
from moa_stream import Budget, Limits, Preset, Slot
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog

QUESTION = "Plan a weekend in Lisbon"
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
PRESETS = {
    "trio": Preset(references=["ref-a", "ref-b", "ref-c"], aggregator="agg"),
    "mixed": Preset(
        references=["ref-a", Slot(model="ref-b", label="via-responses", api="responses")], aggregator="agg"
    ),
}


@pytest.fixture(params=[True, False], ids=["native", "bridged"])
def sim(request: pytest.FixtureRequest) -> Simulator:
    """An upstream with the Responses API, and one without it (the aggregator is then bridged)."""
    models = [SimModel(name=name) for name in ("ref-a", "ref-b", "ref-c", "agg")]
    return Simulator(models, responses=request.param)


def roles(log: EventLog) -> list[tuple[str, str]]:
    return sorted((c.role, c.api) for c in log.of(moa_stream.CallUsage))


def native(sim: Simulator) -> bool:
    return sim._responses  # the fixture's own parameter


async def test_a_streamed_turn_answers_in_responses_events(log: EventLog, sim: Simulator, wrapped: Any) -> None:
    client = wrapped(presets=PRESETS)
    stream = await client.responses.create(model="moa:trio", input=QUESTION, stream=True)
    types, text = [], ""
    async for event in stream:
        types.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    await log.wait_turns(1)
    [trace] = log.of(moa_stream.TurnTrace)
    aggregator = [c for c in trace.calls if c.role == "aggregator"]
    assert aggregator[-1].output.text == text
    assert trace.end.status == "completed"
    references = [c for c in trace.calls if c.role == "reference"]
    assert len(references) == 3
    assert all(r.api == "chat" for r in references)
    # native: one aggregator call through /responses; bridged: the 404 that taught it, then chat
    expected = ["responses"] if native(sim) else ["responses", "chat"]
    assert [c.api for c in aggregator] == expected
    assert aggregator[-1].usage.status == "completed"


async def test_a_non_streamed_turn_is_a_response_object(wrapped: Any, log: EventLog) -> None:
    client = wrapped(presets=PRESETS)
    response = await client.responses.create(model="moa:trio", input=QUESTION)
    assert response.status == "completed"
    assert response.output_text
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    # usage="turn": what the caller is told counts the references too
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (end.input_tokens, end.output_tokens)


async def test_the_stream_helper_accepts_the_answer(wrapped: Any) -> None:
    client = wrapped(presets=PRESETS)
    async with client.responses.stream(model="moa:trio", input=QUESTION, tools=[TOOL]) as stream:
        final = await stream.get_final_response()
    [call] = [item for item in final.output if item.type == "function_call"]  # the aggregator acts
    assert (call.name, sorted(json.loads(call.arguments))) == ("get_weather", ["city"])


async def test_the_bridge_is_learned_once_per_upstream(wrapped: Any, log: EventLog, sim: Simulator) -> None:
    client = wrapped(presets=PRESETS)
    for _ in range(2):
        await client.responses.create(model="moa:trio", input=QUESTION + str(_))
    await log.wait_turns(2)
    aggregators = [c.api for c in log.of(moa_stream.CallUsage) if c.role == "aggregator"]
    assert aggregators == (["responses", "responses"] if native(sim) else ["responses", "chat", "chat"])


async def test_references_see_the_advisory_view_of_the_responses_input(wrapped: Any, log: EventLog) -> None:
    client = wrapped(presets=PRESETS)
    history: Any = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Lisbon"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 24C"},
    ]
    await client.responses.create(model="moa:trio", input=history, instructions="Answer in French.", tools=[TOOL])
    await log.wait_turns(1)
    [trace] = log.of(moa_stream.TurnTrace)
    view = next(c for c in trace.calls if c.role == "reference").input_messages
    flat = " ".join(str(m.get("content")) for m in view)
    assert "Answer in French." in flat
    assert "sunny, 24C" in flat
    assert "get_weather" in flat
    assert view[-1]["role"] == "user"  # references advise and never act: no tools, a user turn last
    assert all("tool_calls" not in m for m in view)


async def test_a_slot_can_call_its_upstream_with_the_responses_api(wrapped: Any, log: EventLog, sim: Simulator) -> None:
    client = wrapped(presets=PRESETS)
    await client.responses.create(model="moa:mixed", input=QUESTION)
    await log.wait_turns(1)
    by_label = {c.label: c for c in log.of(moa_stream.CallUsage) if c.role == "reference"}
    assert (by_label["ref-a"].api, by_label["via-responses"].api) == ("chat", "responses")
    expected = "completed" if native(sim) else "error"  # an upstream without /responses fails that slot
    assert by_label["via-responses"].status == expected


async def test_previous_response_id_gives_the_references_the_whole_conversation(wrapped: Any, log: EventLog) -> None:
    client = wrapped(presets=PRESETS)
    first = await client.responses.create(model="moa:trio", input=QUESTION)
    await client.responses.create(model="moa:trio", input="And on Sunday?", previous_response_id=first.id)
    await log.wait_turns(2)
    second = log.of(moa_stream.TurnTrace)[1]
    view = next(c for c in second.calls if c.role == "reference").input_messages
    texts = [str(m.get("content")) for m in view]
    assert any(QUESTION in t for t in texts)  # the first question...
    assert any(first.output_text in t for t in texts)  # ...and the answer it got
    assert any("And on Sunday?" in t for t in texts)


async def test_instructions_of_a_chained_turn_are_its_own_and_come_first(
    wrapped: Any, log: EventLog, sim: Simulator
) -> None:
    # The API applies `instructions` to their own request only: a follow-up by previous_response_id
    # that repeats them (as the Agents SDK and pydantic-ai do) has them once, ahead of the transcript,
    # and never a system message between a tool call and its output (OpenAI refuses that order).
    client = wrapped(presets=PRESETS)
    first = await client.responses.create(model="moa:trio", instructions="First rules.", input=QUESTION, tools=[TOOL])
    [call] = [item for item in first.output if item.type == "function_call"]
    output: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    second = await client.responses.create(
        model="moa:trio", instructions="Second rules.", previous_response_id=first.id, input=output, tools=[TOOL]
    )
    assert second.status == "completed"  # the simulator refuses a tool message out of place, as OpenAI does
    await log.wait_turns(2)
    view = next(c for c in log.of(moa_stream.TurnTrace)[1].calls if c.role == "reference").input_messages
    texts = " ".join(str(m.get("content")) for m in view)
    assert "Second rules." in texts
    assert "First rules." not in texts
    if not native(sim):  # bridged: the whole conversation went as one chat completion
        sent = sim.requests_seen[-1]["messages"]
        roles_sent = [m["role"] for m in sent]
        assert roles_sent[0] == "system"
        assert "system" not in roles_sent[roles_sent.index("user") :]
        assert not any("First rules." in str(m.get("content")) for m in sent)


@pytest.mark.parametrize(
    ("request_", "param", "says"),
    [
        ({"input": []}, "input", "non-empty"),
        ({"input": [1, 2]}, "input", "must be an object"),
        ({"input": QUESTION, "tools": "get_weather"}, "tools", "array of tool objects"),
        ({"input": QUESTION, "previous_response_id": 7}, "previous_response_id", "must be a string, got int"),
        ({"input": QUESTION, "instructions": ["Be brief."]}, "instructions", "must be a string, got list"),
    ],
)
async def test_a_request_no_api_would_take_is_a_400_naming_the_field(
    wrapped: Any, log: EventLog, request_: dict[str, Any], param: str, says: str
) -> None:
    # Bridged, no upstream would judge the Responses request: the turn refuses what the API refuses.
    client = wrapped(presets=PRESETS)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model="moa:trio", **request_)
    assert refused.value.body["param"] == param  # type: ignore[index]
    assert says in refused.value.message
    await log.wait_turns(1)
    assert log.of(moa_stream.CallUsage) == []  # refused before any call


async def test_an_unknown_previous_response_id_is_refused_when_nothing_could_hold_it(
    wrapped: Any, log: EventLog, sim: Simulator
) -> None:
    client = wrapped(presets=PRESETS)
    follow_up = {"model": "moa:trio", "input": "And on Sunday?", "previous_response_id": "resp_from_elsewhere"}
    if native(sim):  # the aggregator's upstream may hold it: it is asked, and judges
        with pytest.raises(openai.BadRequestError, match="resp_from_elsewhere"):
            await client.responses.create(**follow_up)
        return
    # Bridged, answering would silently drop the conversation: refused, the first time after the
    # aggregator's upstream said it has no /responses, then before any reference is called.
    for _ in range(2):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(**follow_up)
        assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
        assert "is not one of the responses this client served" in refused.value.message
    await log.wait_turns(2)
    first, second = (
        sorted((c.role, c.api, c.status) for c in log.of(moa_stream.CallUsage) if c.turn_id == t.turn_id)
        for t in log.of(moa_stream.TurnEnd)
    )
    assert first == [("aggregator", "responses", "error"), *[("reference", "chat", "completed")] * 3]
    assert second == []
    assert [t.status for t in log.of(moa_stream.TurnEnd)] == ["error", "error"]


async def test_a_function_call_loop_reuses_the_references(wrapped: Any, log: EventLog) -> None:
    client = wrapped(presets=PRESETS)
    first = await client.responses.create(model="moa:trio", input=QUESTION, tools=[TOOL])
    [call] = [item for item in first.output if item.type == "function_call"]
    loop: Any = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    await client.responses.create(model="moa:trio", input=loop, tools=[TOOL])
    await log.wait_turns(2)
    assert [t.cadence for t in log.of(moa_stream.TurnTrace)] == ["miss", "hit"]


async def test_a_budget_refuses_a_responses_turn(wrapped: Any) -> None:
    strict = {"trio": msgspec.structs.replace(PRESETS["trio"], on_budget_short="refuse")}
    client = wrapped(presets=strict, budget=Budget(turn=Limits(calls=2)))
    with pytest.raises(moa_stream.BudgetExceeded):
        await client.responses.create(model="moa:trio", input=QUESTION)


async def test_progress_events_come_as_for_chat(wrapped: Any, log: EventLog) -> None:
    client = wrapped(presets=PRESETS)
    await client.responses.create(model="moa:trio", input=QUESTION)
    await log.wait_turns(1)
    assert [e.done for e in log.of(moa_stream.ReferenceDone)] == [1, 2, 3]
    assert len(log.of(moa_stream.Aggregating)) == 1


async def test_a_responses_turns_answer_names_the_preset_and_carries_the_turns_cost(
    wrapped: Any, log: EventLog
) -> None:
    prices = {
        name: {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
        for name in ("ref-a", "ref-b", "ref-c", "agg")
    }
    client = wrapped(presets=PRESETS, prices=prices)
    whole = await client.responses.create(model="moa:trio", input=QUESTION)
    models = set()
    async with await client.responses.create(model="moa:trio", input=QUESTION, stream=True) as stream:
        async for event in stream:
            response = getattr(event, "response", None)
            if response is not None:
                models.add(response.model)
                if event.type == "response.completed":
                    last = response
    await log.wait_turns(2)
    first, second = sorted(log.of(moa_stream.TurnEnd), key=lambda end: end.started_at)
    assert whole.model == "moa:trio"
    assert whole.usage is not None
    assert whole.usage.model_extra == {"cost": pytest.approx(first.cost_usd)}
    assert models == {"moa:trio"}
    assert last.usage is not None
    assert last.usage.model_extra == {"cost": pytest.approx(second.cost_usd)}
