"""Mixture-of-Agents turns on the simulator: fan-out, quorum and grace, failures, layers, tools, cadence."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest

import moa_stream
from moa_stream import Preset, Slot
from moa_stream._prompt import NO_REFERENCES, STALE_NOTE
from moa_stream.testing import Fault, SimModel, Simulator, sim_client

from .conftest import EventLog
from .test_sim import WEATHER_TOOL

USER = [{"role": "user", "content": "Plan a weekend in Lisbon"}]
Wrapped = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
def sim() -> Simulator:
    return Simulator(
        [
            SimModel(name="ref-a", ttft_s=0.1),
            SimModel(name="ref-b", ttft_s=0.1),
            SimModel(name="ref-c", ttft_s=0.1),
            SimModel(name="ref-slow", fault=Fault(kind="stall", after_chunks=3)),
            SimModel(name="ref-fail", fault=Fault(kind="http_500")),
            SimModel(name="agg"),
        ]
    )


def trio(**options: Any) -> dict[str, Preset]:
    return {"trio": Preset(references=["ref-a", "ref-b", "ref-c"], aggregator="agg", **options)}


async def read_all(stream: openai.AsyncStream[Any]) -> tuple[str, list[Any]]:
    text, chunks = "", []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text, chunks


def calls_by_role(log: EventLog) -> dict[str, list[moa_stream.CallUsage]]:
    roles: dict[str, list[moa_stream.CallUsage]] = {}
    for call in log.of(moa_stream.CallUsage):
        roles.setdefault(call.role, []).append(call)
    return roles


async def test_streamed_turn_meters_every_call_and_traces_what_each_model_saw(
    wrapped: Wrapped, log: EventLog, sim: Simulator
) -> None:
    client = wrapped(presets=trio())
    text, _ = await read_all(
        await client.chat.completions.create(model="moa:trio", messages=USER, stream=True)  # type: ignore[arg-type]
    )
    await log.wait_turns(1)
    roles = calls_by_role(log)
    assert sorted(c.label for c in roles["reference"]) == ["ref-a", "ref-b", "ref-c"]
    assert len(roles["aggregator"]) == 1
    assert sum(sim.stats.requests_by_model.values()) == 4  # one CallUsage per upstream call
    [trace] = log.of(moa_stream.TurnTrace)
    assert (trace.preset, trace.cadence) == ("trio", "miss")
    assert trace.end.calls == 4
    aggregator = next(c for c in trace.calls if c.role == "aggregator")
    assert aggregator.output.text == text
    for reference in (c for c in trace.calls if c.role == "reference"):
        assert reference.output.text in aggregator.input_messages[0]["content"]
        assert reference.input_messages[0]["role"] == "system"  # the advisory view
    assert trace.aggregator_wait_s is not None


async def test_references_run_concurrently(wrapped: Wrapped, sim: Simulator) -> None:
    client = wrapped(presets=trio())
    await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    # all three streams were open at once: the layer costs the slowest reference, not the sum
    assert sim.stats.max_open_streams == 3


async def test_progress_events_count_references_done(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets=trio())
    await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    assert len(log.of(moa_stream.ReferenceStarted)) == 3
    assert [e.done for e in log.of(moa_stream.ReferenceDone)] == [1, 2, 3]
    [aggregating] = log.of(moa_stream.Aggregating)
    assert (aggregating.references_used, aggregating.references_total) == (3, 3)


async def test_quorum_and_grace_cancel_the_straggler_and_close_its_stream(
    wrapped: Wrapped, log: EventLog, sim_idle: Callable[[], Awaitable[None]]
) -> None:
    presets = {"q": Preset(references=["ref-a", "ref-b", "ref-slow"], aggregator="agg", quorum=2, grace=0.05)}
    client = wrapped(presets=presets)
    await client.chat.completions.create(model="moa:q", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    [trace] = log.of(moa_stream.TurnTrace)
    slow = next(c for c in trace.calls if c.label == "ref-slow")
    assert slow.usage.status == "cancelled"
    assert slow.output_source == "partial_stream"
    assert slow.output.text  # what it said before it stalled
    aggregator = next(c for c in trace.calls if c.role == "aggregator")
    assert "ref-slow" in aggregator.input_messages[0]["content"]  # named as unavailable
    assert slow.output.text not in aggregator.input_messages[0]["content"]
    await sim_idle()  # the straggler's HTTP stream was closed


async def test_reference_timeout_is_an_error_with_its_partial_text(wrapped: Wrapped, log: EventLog) -> None:
    presets = {"t": Preset(references=["ref-a", "ref-slow"], aggregator="agg", reference_timeout=0.2)}
    client = wrapped(presets=presets)
    await client.chat.completions.create(model="moa:t", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    slow = next(c for c in log.of(moa_stream.CallUsage) if c.label == "ref-slow")
    assert slow.status == "error"
    assert slow.error == "timed out after 0.2s"


async def test_failed_reference_is_dropped_and_named(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets={"f": Preset(references=["ref-a", "ref-fail"], aggregator="agg")})
    await client.chat.completions.create(model="moa:f", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    failed = next(c for c in log.of(moa_stream.CallUsage) if c.label == "ref-fail")
    assert (failed.status, failed.http_status) == ("error", 500)
    aggregator = next(c for c in log.of(moa_stream.TurnTrace)[0].calls if c.role == "aggregator")
    assert "ref-fail" in aggregator.input_messages[0]["content"]


async def test_all_failed_aggregator_alone_answers_with_a_notice(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets={"alone": Preset(references=["ref-fail", "ref-fail"], aggregator="agg")})
    reply = await client.chat.completions.create(model="moa:alone", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    await log.wait_turns(1)
    aggregator = next(c for c in log.of(moa_stream.TurnTrace)[0].calls if c.role == "aggregator")
    assert aggregator.input_messages[0]["content"].startswith(NO_REFERENCES)


async def test_all_failed_error_policy_raises_before_any_byte_and_sends_no_aggregator(
    wrapped: Wrapped, log: EventLog, sim: Simulator
) -> None:
    client = wrapped(presets={"strict": Preset(references=["ref-fail"], aggregator="agg", on_all_failed="error")})
    with pytest.raises(openai.InternalServerError, match=r"moa:strict: every reference failed \(ref-fail: HTTP 500"):
        await client.chat.completions.create(model="moa:strict", messages=USER, stream=True)  # type: ignore[arg-type]
    assert "agg" not in sim.stats.requests_by_model
    assert sim.stats.requests_by_model["ref-fail"] == 1  # not retried by the SDK
    await log.wait_turns(1)
    assert log.of(moa_stream.TurnEnd)[0].status == "error"


async def test_unknown_preset_lists_the_presets_and_calls_nothing(wrapped: Wrapped, sim: Simulator) -> None:
    client = wrapped(presets=trio())
    with pytest.raises(openai.NotFoundError, match=r"unknown MoA preset 'moa:nope'; presets: moa:trio"):
        await client.chat.completions.create(model="moa:nope", messages=USER)  # type: ignore[arg-type]
    assert sim.stats.requests == 0


async def test_caller_usage_reports_the_whole_turn_by_default(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets={**trio(), "agg-only": Preset(references=["ref-a"], aggregator="agg", usage="aggregator")})
    _, chunks = await read_all(
        await client.chat.completions.create(
            model="moa:trio",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    reply = await client.chat.completions.create(model="moa:agg-only", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(2)
    whole, agg_only = log.of(moa_stream.TurnEnd)
    [usage] = [c.usage for c in chunks if c.usage is not None]
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.input_tokens, whole.output_tokens)
    aggregator = calls_by_role(log)["aggregator"][1]
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        aggregator.input_tokens,
        aggregator.output_tokens,
    )
    assert agg_only.input_tokens > aggregator.input_tokens  # the turn still counts the reference


async def test_non_streamed_turn_returns_a_chat_completion(wrapped: Wrapped) -> None:
    client = wrapped(presets=trio())
    reply = await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    assert isinstance(reply, openai.types.chat.ChatCompletion)
    assert reply.model == "moa:trio"  # its usage is the whole turn's: no one may price it as the aggregator's
    assert reply.choices[0].message.content


async def test_two_layers_each_see_only_the_layer_before(wrapped: Wrapped, log: EventLog) -> None:
    presets = {
        "deep": Preset(layers=[["ref-a", "ref-b"], ["ref-c", Slot(model="ref-a", label="ref-a-2")]], aggregator="agg")
    }
    client = wrapped(presets=presets)
    await client.chat.completions.create(model="moa:deep", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    calls = {c.label: c for c in log.of(moa_stream.TurnTrace)[0].calls}
    first = [calls["ref-a"].output.text, calls["ref-b"].output.text]
    second = [calls["ref-c"].output.text, calls["ref-a-2"].output.text]
    layer_two_prompt = calls["ref-c"].input_messages[0]["content"]
    aggregator_prompt = calls["agg"].input_messages[0]["content"]
    assert all(text in layer_two_prompt for text in first)
    assert all(text in aggregator_prompt for text in second)
    assert not any(text in aggregator_prompt for text in first)


async def test_only_the_aggregator_gets_tools_and_its_tool_call_streams_to_the_caller(
    wrapped: Wrapped, sim: Simulator
) -> None:
    client = wrapped(presets=trio())
    async with client.chat.completions.stream(
        model="moa:trio",
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],
    ) as stream:
        final = await stream.get_final_completion()
    [tool_call] = final.choices[0].message.tool_calls or []
    assert tool_call.function.name == "get_weather"  # type: ignore[union-attr]
    requests = {r["model"]: r for r in sim.requests_seen}
    assert all("tools" not in requests[name] for name in ("ref-a", "ref-b", "ref-c"))
    assert requests["agg"]["tools"][0]["function"]["name"] == "get_weather"


async def test_cadence_per_user_turn_reuses_references_across_a_tool_loop(
    wrapped: Wrapped, log: EventLog, sim: Simulator
) -> None:
    client = wrapped(presets=trio())
    messages: list[Any] = list(USER)
    first = await client.chat.completions.create(model="moa:trio", messages=messages, tools=[WEATHER_TOOL])  # type: ignore[arg-type]
    [tool_call] = first.choices[0].message.tool_calls or []
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps({"forecast": "sunny"})},
    ]
    second = await client.chat.completions.create(model="moa:trio", messages=messages, tools=[WEATHER_TOOL])  # type: ignore[arg-type]
    assert second.choices[0].message.content
    messages += [
        {"role": "assistant", "content": second.choices[0].message.content},
        {"role": "user", "content": "And Porto?"},
    ]
    await client.chat.completions.create(model="moa:trio", messages=messages, tools=[WEATHER_TOOL])  # type: ignore[arg-type]
    await log.wait_turns(3)
    traces = log.of(moa_stream.TurnTrace)
    assert [t.cadence for t in traces] == ["miss", "hit", "miss"]
    assert [t.end.calls for t in traces] == [4, 1, 4]
    assert sim.stats.requests_by_model["ref-a"] == 2
    hit_prompt = next(c for c in traces[1].calls if c.role == "aggregator").input_messages[0]["content"]
    assert STALE_NOTE in hit_prompt  # the references predate the tool result
    assert len(log.of(moa_stream.CallUsage)) == 9


async def test_cadence_per_call_always_reruns(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets=trio(cadence="per_call"))
    for _ in range(2):
        await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(2)
    assert [t.cadence for t in log.of(moa_stream.TurnTrace)] == ["miss", "miss"]


def tool_steps(count: int) -> list[list[Any]]:
    """The transcripts of one user turn's tool loop: the question, then each tool call and result."""
    messages: list[Any] = list(USER)
    steps = [list(messages)]
    for step in range(1, count):
        call = {"id": f"call_{step}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{step}", "content": "sunny"},
        ]
        steps.append(list(messages))
    return steps


async def test_cadence_every_n_reruns_on_the_nth_call(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets=trio(cadence="every_n", every_n=2))
    for messages in tool_steps(4):
        await client.chat.completions.create(model="moa:trio", messages=messages)
        await log.wait_turns(len(log.of(moa_stream.TurnTrace)) + 1)
    assert [t.cadence for t in log.of(moa_stream.TurnTrace)] == ["miss", "hit", "miss", "hit"]


async def test_the_same_request_again_gets_fresh_references_unless_the_preset_reuses_repeats(
    wrapped: Wrapped, log: EventLog, sim: Simulator
) -> None:
    fresh = wrapped(presets=trio())
    for _ in range(2):  # a "regenerate" is not a tool loop
        await fresh.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(2)
    assert [t.cadence for t in log.of(moa_stream.TurnTrace)] == ["miss", "miss"]
    assert sim.stats.requests_by_model["ref-a"] == 2
    reusing = wrapped(presets=trio(cache_repeats=True))
    for _ in range(2):
        await reusing.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(4)
    assert [t.cadence for t in log.of(moa_stream.TurnTrace)][2:] == ["miss", "hit"]


async def test_slot_with_its_own_client_calls_that_upstream(wrapped: Wrapped, log: EventLog, sim: Simulator) -> None:
    other = Simulator([SimModel(name="elsewhere")])
    other_client = sim_client(other, base_url="http://other.local/v1")
    presets = {"mixed": Preset(references=["ref-a", Slot(model="elsewhere", client=other_client)], aggregator="agg")}
    client = wrapped(presets=presets)
    await client.chat.completions.create(model="moa:mixed", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    assert other.stats.requests_by_model == {"elsewhere": 1}
    assert "elsewhere" not in sim.stats.requests_by_model
    elsewhere = next(c for c in log.of(moa_stream.CallUsage) if c.label == "elsewhere")
    assert elsewhere.provider == "other.local"
    assert other.headers_seen[0]["authorization"] == "Bearer sim-key"
    await other_client.close()


async def test_slot_by_base_url_needs_its_key_variable_at_wrap(
    wrapped: Wrapped, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOA_TEST_UNSET_KEY", raising=False)
    slot = Slot(model="x", base_url="http://127.0.0.1:9/v1", api_key_env="MOA_TEST_UNSET_KEY")
    with pytest.raises(
        moa_stream.ConfigError,
        match=r"presets=: preset 'k': slot 'x': api_key_env: environment variable MOA_TEST_UNSET_KEY is not set",
    ):
        wrapped(presets={"k": Preset(references=[slot], aggregator="agg")})


async def test_key_variable_gone_after_wrap_fails_the_turn_with_its_reason(
    wrapped: Wrapped, sim: Simulator, log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOA_TEST_LATER_UNSET", "sk-later")
    slot = Slot(model="x", base_url="http://127.0.0.1:9/v1", api_key_env="MOA_TEST_LATER_UNSET")
    client = wrapped(presets={"k": Preset(references=[slot], aggregator="agg")})
    monkeypatch.delenv("MOA_TEST_LATER_UNSET")
    with pytest.raises(openai.InternalServerError, match="MOA_TEST_LATER_UNSET"):
        await client.chat.completions.create(model="moa:k", messages=USER)  # type: ignore[arg-type]
    assert sim.stats.requests == 0
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    assert (end.status, end.calls) == ("error", 0)
    assert end.error is not None
    assert "MOA_TEST_LATER_UNSET" in end.error
    assert log.of(moa_stream.TurnTrace)[0].end == end


async def test_request_refused_before_any_call_still_ends_its_turn(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets=trio())
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="moa:nope", messages=USER)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="moa:trio", messages=[])
    await log.wait_turns(2)
    ends = log.of(moa_stream.TurnEnd)
    assert [(e.model, e.status, e.calls) for e in ends] == [("moa:nope", "error", 0), ("moa:trio", "error", 0)]
    assert "unknown MoA preset" in (ends[0].error or "")
    assert "messages" in (ends[1].error or "")


async def test_capacity_limit_serializes_references_on_one_upstream(wrapped: Wrapped, sim: Simulator) -> None:
    client = wrapped(presets=trio(), upstream_concurrency=1)
    await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    assert sim.stats.requests_by_model == {"ref-a": 1, "ref-b": 1, "ref-c": 1, "agg": 1}
    assert sim.stats.max_open_streams == 1


async def test_caller_cancelled_during_fan_out_still_ends_the_turn(wrapped: Wrapped, log: EventLog) -> None:
    import anyio

    client = wrapped(presets={"s": Preset(references=["ref-slow"], aggregator="agg")})
    with anyio.move_on_after(0.3):
        await client.chat.completions.create(model="moa:s", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    assert end.status == "cancelled"
    assert [c.status for c in log.of(moa_stream.CallUsage)] == ["cancelled"]


async def test_preset_from_a_toml_file_runs(wrapped: Wrapped, log: EventLog, tmp_path: Any) -> None:
    config = tmp_path / "moa.toml"
    config.write_text(
        '[presets.duo]\nreferences = ["ref-a", { model = "ref-b", temperature = 0.2 }]\naggregator = "agg"\n'
    )
    client = wrapped(config=config)
    await client.chat.completions.create(model="moa:duo", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    assert sorted(c.label for c in log.of(moa_stream.CallUsage)) == ["agg", "ref-a", "ref-b"]


async def test_self_moa_samples_one_model_with_different_seeds(wrapped: Wrapped, log: EventLog, sim: Simulator) -> None:
    client = wrapped(presets={"self": Preset(references=moa_stream.self_moa("ref-a", 3), aggregator="agg")})
    await client.chat.completions.create(model="moa:self", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    references = [c for c in log.of(moa_stream.TurnTrace)[0].calls if c.role == "reference"]
    assert sorted(c.label for c in references) == ["ref-a#1", "ref-a#2", "ref-a#3"]
    assert len({c.output.text for c in references}) == 3  # the samples differ
    assert sorted(r["seed"] for r in sim.requests_seen if r["model"] == "ref-a") == [1, 2, 3]


async def test_preset_defined_twice_is_refused(upstream: openai.AsyncOpenAI, tmp_path: Any) -> None:
    config = tmp_path / "moa.toml"
    config.write_text('[presets.trio]\nreferences = ["ref-a"]\naggregator = "agg"\n')
    with pytest.raises(moa_stream.ConfigError, match=r"preset 'trio' is also defined in .*moa\.toml"):
        moa_stream.wrap(upstream, presets=trio(), config=config)


async def test_bad_preset_is_refused_at_wrap(upstream: openai.AsyncOpenAI) -> None:
    with pytest.raises(moa_stream.ConfigError, match=r"presets=: preset 'bad': field 'quorum'"):
        moa_stream.wrap(upstream, presets={"bad": Preset(references=["ref-a"], aggregator="agg", quorum=2)})


async def test_aggregator_slot_system_instruction_leads_its_messages(wrapped: Wrapped, log: EventLog) -> None:
    aggregator = Slot(model="agg", system="Answer in French.")
    client = wrapped(presets={"fr": Preset(references=["ref-a"], aggregator=aggregator)})
    await client.chat.completions.create(model="moa:fr", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    sent = next(c for c in log.of(moa_stream.TurnTrace)[0].calls if c.role == "aggregator").input_messages
    assert sent[0]["role"] == "system"
    assert sent[0]["content"].startswith("Answer in French.\n\n")  # the reference block follows it
    assert sent[1:] == USER


@pytest.mark.parametrize("fault", ["disconnect", "malformed", "stream_error"])
async def test_reference_broken_mid_stream_is_a_failed_reference_not_a_failed_turn(
    wrapped: Wrapped, log: EventLog, sim: Simulator, fault: str
) -> None:
    broken = Simulator([SimModel(name="broken", fault=Fault(kind=fault, after_chunks=2))])  # type: ignore[arg-type]
    other = sim_client(broken, base_url="http://broken.local/v1")
    presets = {"b": Preset(references=["ref-a", Slot(model="broken", client=other)], aggregator="agg")}
    client = wrapped(presets=presets)
    reply = await client.chat.completions.create(model="moa:b", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    await log.wait_turns(1)
    failed = next(c for c in log.of(moa_stream.CallUsage) if c.label == "broken")
    assert failed.status == "error"
    assert failed.error
    assert log.of(moa_stream.TurnEnd)[0].status == "completed"
    await other.close()


async def test_unreachable_reference_upstream_is_a_failed_reference(wrapped: Wrapped, log: EventLog) -> None:
    dead = Slot(model="x", base_url="http://127.0.0.1:9/v1")
    client = wrapped(presets={"d": Preset(references=["ref-a", dead], aggregator="agg")})
    reply = await client.chat.completions.create(model="moa:d", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    await log.wait_turns(1)
    failed = next(c for c in log.of(moa_stream.CallUsage) if c.label == "x")
    assert (failed.status, failed.http_status) == ("error", None)
    assert "ConnectError" in (failed.error or "")


# -- references that say nothing, reasons of failed turns, retries --------------------------------


async def test_reference_with_no_text_is_unusable_and_does_not_meet_the_quorum(wrapped: Wrapped, log: EventLog) -> None:
    # an instant reference that answers with a tool call only, next to a slower one with text
    tool_only = Slot(model="agg", label="tool-only", extra={"tools": [WEATHER_TOOL], "tool_choice": "required"})
    presets = {"q": Preset(references=[tool_only, "ref-b"], aggregator="agg", quorum=1, grace=0.0)}
    client = wrapped(presets=presets)
    await client.chat.completions.create(model="moa:q", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    [trace] = log.of(moa_stream.TurnTrace)
    by_label = {c.label: c for c in trace.calls}
    assert by_label["tool-only"].usage.status == "completed"  # metered as it really ended
    assert by_label["tool-only"].output.tool_calls
    assert not by_label["tool-only"].output.text
    assert by_label["ref-b"].usage.status == "completed"  # the quorum waited for a usable answer
    [aggregating] = log.of(moa_stream.Aggregating)
    assert (aggregating.references_used, aggregating.references_total) == (1, 2)
    block = by_label["agg"].input_messages[0]["content"]
    assert "tool-only" in block  # named among the missing
    assert "2." not in block  # no empty numbered answer


async def test_all_failed_error_policy_puts_the_reason_in_the_turn_end(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets={"strict": Preset(references=["ref-fail"], aggregator="agg", on_all_failed="error")})
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="moa:strict", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    [end] = log.of(moa_stream.TurnEnd)
    assert end.status == "error"
    assert end.error is not None
    assert end.error.startswith("moa:strict: every reference failed (ref-fail: HTTP 500")
    assert "\n" not in end.error
    assert log.of(moa_stream.TurnTrace)[0].end.error == end.error


async def test_unreachable_upstream_puts_the_reason_in_the_turn_end(log: EventLog, tmp_path: Any) -> None:
    client = moa_stream.wrap(
        openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key="k", max_retries=0), sinks=[log]
    )
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    await client.close()
    [end] = log.of(moa_stream.TurnEnd)
    assert end.status == "error"
    assert end.error is not None
    assert "ConnectError" in end.error


def closed_port() -> int:
    """A loopback port nobody listens on: connections to it are refused."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_sdk_retries_never_rerun_a_turn_against_an_unreachable_upstream(log: EventLog) -> None:
    # The SDK's default of two retries: each would have rerun every reference.
    client = moa_stream.wrap(
        openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key="k"),
        sinks=[log],
        presets=trio(),
    )
    with pytest.raises(openai.InternalServerError, match=r"could not be reached") as raised:
        await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    assert raised.value.status_code == 502
    assert "127.0.0.1" in str(raised.value)  # names where it tried
    await client.close()
    assert len(log.of(moa_stream.TurnEnd)) == 1
    calls = log.of(moa_stream.CallUsage)
    # each reference once, and one aggregator attempt, not retried: its host refused every reference
    assert sorted(c.role for c in calls) == ["aggregator", "reference", "reference", "reference"]


async def test_the_turn_retries_its_aggregator_itself_and_the_sdk_never_reruns_references(
    wrapped: Wrapped, log: EventLog, sim: Simulator, upstream: openai.AsyncOpenAI
) -> None:
    limited = Simulator([SimModel(name="agg", fault=Fault(kind="http_429"))])
    agg = Slot(model="agg", client=sim_client(limited))
    client = moa_stream.wrap(
        upstream.with_options(max_retries=2),
        sinks=[log],
        presets={"r": Preset(references=["ref-a", "ref-b"], aggregator=agg, aggregator_retries=2)},
    )
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="moa:r", messages=USER)  # type: ignore[arg-type]
    await client.close()
    assert sim.stats.requests_by_model == {"ref-a": 1, "ref-b": 1}  # the references ran once
    assert limited.stats.requests_by_model == {"agg": 3}  # one attempt and the preset's two retries
    [end] = log.of(moa_stream.TurnEnd)
    assert (end.calls, end.status) == (5, "error")
    assert end.error is not None
    assert "429" in end.error


async def test_a_turn_end_counts_the_acting_models_tool_calls_and_names_them(
    wrapped: Wrapped, log: EventLog, sim: Simulator
) -> None:
    client = wrapped(presets=trio())
    with moa_stream.session("tools"):
        await client.chat.completions.create(model="moa:trio", messages=USER, tools=[WEATHER_TOOL])  # type: ignore[arg-type]
        await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(2)
    with_tools, without = sorted(log.of(moa_stream.TurnEnd), key=lambda end: end.started_at)
    assert (with_tools.tool_calls, with_tools.tool_names) == (1, ["get_weather"])
    assert (without.tool_calls, without.tool_names) == (0, [])
    aggregator = next(c for c in log.of(moa_stream.CallUsage) if c.role == "aggregator" and c.tool_calls)
    assert aggregator.turn_id == with_tools.turn_id
    ledger = moa_stream.session_ledger(client, "tools")
    assert ledger.totals.tool_calls == ledger.by_role["aggregator"].tool_calls == 1


PRICES = {name: {"input_cost_per_token": 1e-6, "output_cost_per_token": 4e-6} for name in ("ref-a", "ref-b", "ref-c")}
PRICES["agg"] = {"input_cost_per_token": 1e-5, "output_cost_per_token": 3e-5}


async def test_a_turns_answer_names_the_preset_and_carries_the_turns_exact_cost(
    wrapped: Wrapped, log: EventLog
) -> None:
    client = wrapped(presets=trio(), prices=PRICES)
    reply = await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    stream = await client.chat.completions.create(
        model="moa:trio",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    _, chunks = await read_all(stream)
    await log.wait_turns(2)
    first, second = sorted(log.of(moa_stream.TurnEnd), key=lambda end: end.started_at)
    assert reply.usage is not None
    assert reply.usage.model_extra == {"cost": pytest.approx(first.cost_usd)}
    assert reply.usage.total_tokens == first.input_tokens + first.output_tokens
    assert {chunk.model for chunk in chunks} == {"moa:trio"}
    assert chunks[-1].usage.model_extra == {"cost": pytest.approx(second.cost_usd)}
    assert first.cost_complete
    assert first.cost_usd > 0


async def test_an_answer_with_the_aggregators_usage_names_it_and_carries_its_cost(
    wrapped: Wrapped, log: EventLog
) -> None:
    client = wrapped(presets=trio(usage="aggregator"), prices=PRICES)
    reply = await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    await log.wait_turns(1)
    [aggregator] = [call for call in log.of(moa_stream.CallUsage) if call.role == "aggregator"]
    assert reply.model == "agg"
    assert reply.usage is not None
    assert reply.usage.model_extra == {"cost": pytest.approx(aggregator.cost_usd)}
    assert reply.usage.prompt_tokens == aggregator.input_tokens


async def test_no_cost_is_claimed_when_a_price_is_unknown(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped(presets=trio(), prices={"agg": PRICES["agg"]})  # the references' prices: unknown
    reply = await client.chat.completions.create(model="moa:trio", messages=USER)  # type: ignore[arg-type]
    assert reply.usage is not None
    assert "cost" not in (reply.usage.model_extra or {})
