"""Message content on the spans, opt-in (`OTelSink(capture_content=True)`): the GenAI conventions'
JSON shape, built from the trace record, so always after the client's `redact=`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan

import moa_stream
from moa_stream import Preset
from moa_stream._otel import OTelSink
from moa_stream.testing import SimModel, Simulator

from .conftest import EventLog
from .test_otel import Telemetry, attrs, by_label, moa_turn
from .test_sim import WEATHER_TOOL

Wrapped = Callable[..., openai.AsyncOpenAI]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "rainy, 7C"},
]


@pytest.fixture
def sim() -> Simulator:
    return Simulator([SimModel(name="m1"), SimModel(name="m2"), SimModel(name="m-reasoner", reasoning_tokens=4)])


@pytest.fixture
def otel() -> Telemetry:
    telemetry = Telemetry()
    telemetry.sink = OTelSink(
        tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider, capture_content=True
    )
    return telemetry


def content(span: ReadableSpan, key: str) -> Any:
    value = attrs(span)[key]
    assert isinstance(value, str)  # span attributes hold no nested maps: a JSON string
    return json.loads(value)


async def test_content_is_off_by_default(wrapped: Wrapped, log: EventLog) -> None:
    telemetry = Telemetry()
    client = wrapped(sinks=[log, telemetry.sink])
    await client.chat.completions.create(model="m1", messages=CONVERSATION)  # type: ignore[arg-type]
    await moa_stream.flush(client)
    [span] = telemetry.spans()
    assert not {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"} & set(attrs(span))


async def test_a_chat_call_carries_its_messages_in_the_conventions_shape(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(sinks=[log, otel.sink])
    answer = await client.chat.completions.create(model="m1", messages=CONVERSATION)  # type: ignore[arg-type]
    await moa_stream.flush(client)
    [span] = otel.spans()
    assert content(span, "gen_ai.input.messages") == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Oslo?"}]},
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Oslo"}}],
        },
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rainy, 7C"}]},
    ]
    assert content(span, "gen_ai.output.messages") == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": answer.choices[0].message.content}],
            "finish_reason": "stop",
        }
    ]


async def test_streamed_output_with_reasoning_and_tool_calls(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    client = wrapped(sinks=[log, otel.sink])
    stream = await client.chat.completions.create(
        model="m-reasoner",
        messages=CONVERSATION[:2],  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],
        tool_choice="required",
        stream=True,
    )
    async for _ in stream:
        pass
    await moa_stream.flush(client)
    [span] = otel.spans()
    [record] = log.of(moa_stream.TurnTrace)
    [tool_call] = record.calls[0].output.tool_calls
    [message] = content(span, "gen_ai.output.messages")
    assert message["finish_reason"] == "tool_call"  # OpenAI's `tool_calls`, as the conventions name it
    assert message["parts"][0] == {"type": "reasoning", "content": record.calls[0].output.reasoning}
    assert message["parts"][-1] == {
        "type": "tool_call",
        "id": tool_call.id,
        "name": tool_call.name,
        "arguments": json.loads(tool_call.arguments),
    }


async def test_each_call_of_a_moa_turn_carries_what_it_saw_and_said(
    wrapped: Wrapped, log: EventLog, otel: Telemetry
) -> None:
    client = wrapped(presets={"duo": Preset(references=["m1", "m2"], aggregator="m1")}, sinks=[log, otel.sink])
    await moa_turn(client, "duo")
    [record] = log.of(moa_stream.TurnTrace)
    spans = {attrs(span)["moa.role"] + ":" + attrs(span)["moa.label"]: span for span in otel.client_spans()}
    for call in record.calls:
        span = spans[f"{call.role}:{call.label}"]
        seen = content(span, "gen_ai.input.messages")
        assert [m["role"] for m in seen] == [m["role"] for m in call.input_messages]
        [said] = content(span, "gen_ai.output.messages")
        assert said["parts"] == [{"type": "text", "content": call.output.text}]
    [label] = [call.label for call in record.calls if call.role == "aggregator"]
    aggregator = content(spans[f"aggregator:{label}"], "gen_ai.input.messages")
    references = [call.output.text for call in record.calls if call.role == "reference"]
    injected = json.dumps(aggregator)
    assert all(json.dumps(text)[1:-1] in injected for text in references)  # the references it was given


async def test_captured_content_is_always_after_redaction(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    secret = [
        {"role": "system", "content": "Key SECRET-1 stays here."},
        {"role": "user", "content": [{"type": "text", "text": "My card is SECRET-2"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{**CALL, "function": {"name": "f", "arguments": '"SECRET-3"'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "SECRET-4"},
    ]
    client = wrapped(redact=[r"SECRET-\d"], sinks=[log, otel.sink])
    await client.chat.completions.create(model="m1", messages=secret)  # type: ignore[arg-type]
    await moa_stream.flush(client)
    [span] = otel.spans()
    exported = json.dumps(attrs(span))
    assert "SECRET" not in exported
    assert exported.count("[REDACTED]") == 4


async def test_responses_content_is_captured_after_redaction_too(
    wrapped: Wrapped, log: EventLog, otel: Telemetry, tmp_path: Path
) -> None:
    client = wrapped(redact=[r"SECRET-\d"], sinks=[log, otel.sink], trace_dir=tmp_path)
    with moa_stream.session("r"):
        await client.responses.create(
            model="m1",
            instructions="SECRET-1 instructions",
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "weather SECRET-2?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"k": "SECRET-3"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "SECRET-4"},
            ],
        )
    await moa_stream.flush(client)
    [span] = otel.spans()
    assert "SECRET" not in json.dumps(attrs(span))
    assert content(span, "gen_ai.input.messages") == [
        {"role": "user", "parts": [{"type": "text", "content": "weather [REDACTED]?"}]},
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "id": "c1", "name": "get_weather", "arguments": {"k": "[REDACTED]"}}],
        },
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "[REDACTED]"}]},
    ]
    assert content(span, "gen_ai.system_instructions") == [{"type": "text", "content": "[REDACTED] instructions"}]
    [said] = content(span, "gen_ai.output.messages")
    assert (said["role"], said["finish_reason"], said["parts"][0]["type"]) == ("assistant", "stop", "text")
    # the trace file holds the same redacted copy
    assert "SECRET" not in (tmp_path / "r.jsonl").read_text()


async def test_a_call_with_no_answer_has_input_and_no_output(wrapped: Wrapped, log: EventLog, otel: Telemetry) -> None:
    client = wrapped(sinks=[log, otel.sink])
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="m1",
            messages=CONVERSATION[:2],  # type: ignore[arg-type]
            extra_headers={"x-sim-fault": "http_429"},
        )
    await moa_stream.flush(client)
    [span] = otel.spans()
    assert len(content(span, "gen_ai.input.messages")) == 2
    assert "gen_ai.output.messages" not in attrs(span)
    assert by_label([span])  # the span is there, with its label
