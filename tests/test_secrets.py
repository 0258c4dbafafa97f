"""No credential in any event, trace or log line; redaction of persisted copies only."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import openai
import pytest

import moa_stream
from moa_stream import Preset, Slot
from moa_stream.testing import Fault, SimModel, Simulator, sim_client

from .conftest import EventLog
from .scripted import SSE, Reply, Request, ScriptedUpstream, error_reply, sse

SENTINEL = "sk-SENTINEL-6f1e2d3c4b5a"
OTHER_SENTINEL = "sk-OTHER-SENTINEL-0a9b8c"
SECRET = "card 4111-1111-1111-1111"


def trace_texts(directory: Path) -> list[str]:
    return [path.read_text() for path in directory.glob("*.jsonl")]


@pytest.fixture
def sim() -> Simulator:
    return Simulator([SimModel(name="m"), SimModel(name="broken", fault=Fault(kind="http_500"))])


async def test_api_keys_appear_in_no_event_trace_or_log(
    sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log = EventLog()

    def failing_sink(event: moa_stream.Event) -> None:
        raise RuntimeError("sink down")  # makes the dispatcher log

    other = sim_client(sim, api_key=OTHER_SENTINEL, base_url="http://other.local/v1")
    presets = {"p": Preset(references=["m", Slot(model="m", label="own", client=other), "broken"], aggregator="m")}
    client = moa_stream.wrap(
        sim_client(sim, api_key=SENTINEL, max_retries=0),
        sinks=[log, failing_sink],
        trace_dir=tmp_path,
        presets=presets,
    )
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    async for _ in await client.chat.completions.create(
        model="moa:p", messages=[{"role": "user", "content": "hi"}], stream=True
    ):
        pass
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    await other.close()
    # the keys did reach the upstream, so their absence below is not for want of use
    assert {h["authorization"] for h in sim.headers_seen} == {f"Bearer {SENTINEL}", f"Bearer {OTHER_SENTINEL}"}
    written = [moa_stream.event_encoder.encode(e).decode() for e in log.events]
    written += trace_texts(tmp_path)
    written += [record.getMessage() + str(record.exc_info) for record in caplog.records]
    assert len(log.events) >= 9
    for text in written:
        assert SENTINEL not in text
        assert OTHER_SENTINEL not in text
        assert "Bearer" not in text


async def test_redaction_applies_to_persisted_copies_only(sim: Simulator, tmp_path: Path) -> None:
    log = EventLog()
    client = moa_stream.wrap(sim_client(sim), sinks=[log], trace_dir=tmp_path, redact=[r"\d{4}-\d{4}-\d{4}-\d{4}"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"my {SECRET} please"}]
    with moa_stream.session("r"):
        await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    await client.close()
    assert SECRET in sim.requests_seen[-1]["messages"][1]["content"]  # upstream got the real text
    [trace] = moa_stream.read_traces(tmp_path / "r.jsonl")
    assert trace.calls[0].input_messages[1]["content"] == "my card [REDACTED] please"
    assert trace.calls[0].input_messages[0]["content"] == "be brief"
    [sunk] = log.of(moa_stream.TurnTrace)
    assert sunk == trace
    assert messages[1]["content"] == f"my {SECRET} please"  # the caller's own list is untouched


async def test_a_redaction_callable_sees_outputs_and_tool_arguments(sim: Simulator, tmp_path: Path) -> None:
    client = moa_stream.wrap(sim_client(sim), trace_dir=tmp_path, redact=lambda text: text.upper())
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
        }
    ]
    with moa_stream.session("c"):
        reply = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "look it up"}],
            tools=tools,  # type: ignore[arg-type]
        )
    await client.close()
    [trace] = moa_stream.read_traces(tmp_path / "c.jsonl")
    [call] = trace.calls[0].output.tool_calls
    assert call.arguments == reply.choices[0].message.tool_calls[0].function.arguments.upper()  # type: ignore[index,union-attr]
    assert trace.calls[0].input_messages[0]["content"] == "LOOK IT UP"


def test_bad_redaction_pattern_is_refused_at_wrap(sim: Simulator) -> None:
    with pytest.raises(ValueError, match=r"redact: pattern '\(' is not a valid regular expression"):
        moa_stream.wrap(sim_client(sim), redact=["("])


def echoing_gateway(request: Request) -> Reply:
    """A gateway that echoes what it was sent into its errors: the headers, the query string, and
    for streams an in-stream error event."""
    seen = f"headers={request.headers!r} path={request.path}"
    if request.json().get("stream"):
        event = {"error": {"message": f"upstream refused: {seen}", "type": "server_error"}}
        return Reply(headers=SSE, parts=[sse(event)])
    return error_reply(401, f"Incorrect API key provided; request was {seen}")


@pytest.mark.parametrize("where", ["bearer", "azure_header", "query"])
async def test_credentials_echoed_by_an_upstream_error_appear_in_no_event_trace_or_log(
    where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log = EventLog()
    with ScriptedUpstream(echoing_gateway) as gateway:
        if where == "bearer":
            bare = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=SENTINEL, max_retries=0)
        elif where == "azure_header":
            bare = openai.AsyncOpenAI(
                base_url=gateway.base_url, api_key="unused-key", default_headers={"api-key": SENTINEL}, max_retries=0
            )
        else:
            bare = openai.AsyncOpenAI(
                base_url=gateway.base_url, api_key="unused-key", default_query={"key": SENTINEL}, max_retries=0
            )
        presets = {"p": Preset(references=["a", "b"], aggregator="c")}
        client = moa_stream.wrap(bare, sinks=[log], trace_dir=tmp_path, presets=presets)
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert SENTINEL in str(raised.value)  # the caller gets the upstream's own answer, as with the bare SDK
        with pytest.raises(openai.APIError):
            async for _ in await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                pass
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="moa:p", messages=[{"role": "user", "content": "hi"}])
        await client.close()
    written = [moa_stream.event_encoder.encode(e).decode() for e in log.events]
    written += trace_texts(tmp_path)
    written += [
        record.getMessage() + str(record.exc_info) for record in caplog.records if record.name.startswith("moa")
    ]
    errors = [c.error for c in log.of(moa_stream.CallUsage)]
    assert len(errors) == 5
    assert all(errors)
    assert all("[REDACTED]" in e for e in errors if e)  # the rest of the reason is kept
    for text in written:
        assert SENTINEL not in text


def test_redaction_reaches_every_text_of_a_responses_request() -> None:
    from moa_stream._events import CallRecord, CallUsage
    from moa_stream._redact import redact_trace

    from .test_traces import trace_record

    usage = CallUsage(call_id="c", turn_id="t", session_id="s", role="direct", label="m", model="m", provider="p",
                      started_at=0.0, duration_s=0.0, status="completed")  # fmt: skip
    record = CallRecord(
        call_id="c",
        role="direct",
        label="m",
        model="m",
        provider="p",
        input_messages=[
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no SECRET-1"}]},
            {"type": "function_call", "call_id": "x", "name": "f", "arguments": '{"q": "SECRET-2"}'},
            {"type": "function_call_output", "call_id": "x", "output": "SECRET-3"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "SECRET-4"}]},
        ],
        output=moa_stream.CallOutput(text="fine"),
        output_source="inline",
        usage=usage,
        instructions="be SECRET-5",
    )
    trace = msgspec.structs.replace(trace_record(), calls=[record])
    redacted = redact_trace(trace, lambda text: text.replace("SECRET", "[X]"))
    assert "SECRET" not in moa_stream.event_encoder.encode(redacted).decode()
    assert redacted.calls[0].instructions == "be [X]-5"
