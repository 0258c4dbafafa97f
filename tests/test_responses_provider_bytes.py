"""Responses API streams as providers put them on the wire (an upstream we did not write): the caller
reads what the bare SDK reads, and each call is metered from the provider's own events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import moa_stream

from .conftest import EventLog
from .scripted import (
    OPENAI_RESPONSES_USAGE,
    RESPONSE_ID,
    SSE,
    Reply,
    Request,
    ScriptedUpstream,
    event_stream,
    openai_response,
    openai_response_events,
)

WORDS = ["Streams", "carry", "tokens", "one", "by", "one."]
WIDE_WORDS = ["Café", "naïve", "🌊", "終わり"]  # multi-byte text, split across reads below
SUMMARY = ["Thinking about ", "streams."]
OLLAMA_USAGE = {"input_tokens": 30, "output_tokens": 6, "total_tokens": 36}  # no details


def _stream(model: str) -> list[bytes]:
    """The SSE parts a provider of each kind sends for `model`."""
    if model == "openai":
        return event_stream(openai_response_events(WORDS))
    if model == "openai-reasoning":
        return event_stream(openai_response_events(WORDS, reasoning=SUMMARY))
    if model == "data-only-done":  # gateways that send data lines only, and end with [DONE] as for chat
        return [*event_stream(openai_response_events(WORDS), named=False), b"data: [DONE]\n\n"]
    if model == "crlf-keepalive":  # CRLF line ends, `data:` without its space, keep-alive comments
        blocks = event_stream(openai_response_events(WORDS), newline=b"\r\n")
        parts = [block.replace(b"data: ", b"data:") for block in blocks]
        return [part for block in parts for part in (b": keep-alive\r\n\r\n", block)]
    if model == "split-reads":  # the bytes cut every 7 bytes, through multi-byte characters too
        whole = b"".join(event_stream(openai_response_events(WIDE_WORDS)))
        return [whole[i : i + 7] for i in range(0, len(whole), 7)]
    if model == "ollama-usage":
        return event_stream(openai_response_events(WORDS, usage=OLLAMA_USAGE))
    if model == "usage-null":
        return event_stream(openai_response_events(WORDS, usage=None))
    if model == "incomplete":
        return event_stream(openai_response_events(WORDS, terminal="response.incomplete"))
    if model == "failed":
        return event_stream(openai_response_events(WORDS, terminal="response.failed"))
    if model == "error-event":  # an `error` event mid-answer, and the stream ends
        events = openai_response_events(WORDS)[:6]
        error = {
            "type": "error",
            "sequence_number": 6,
            "code": "server_error",
            "message": "An error occurred while processing your request.",
            "param": None,
        }
        return event_stream([*events, error])
    if model == "cut":  # the connection's body ends cleanly after a few deltas: no terminal event
        return event_stream(openai_response_events(WORDS)[:7])
    raise AssertionError(f"no script for {model}")


@pytest.fixture
def provider() -> Iterator[ScriptedUpstream]:
    def handler(request: Request) -> Reply:
        body = request.json()
        model = body["model"]
        if body.get("stream"):
            return Reply(headers=SSE, parts=_stream(model))
        output = [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": []}]
        output[0]["content"] = [{"type": "output_text", "annotations": [], "logprobs": [], "text": " ".join(WORDS)}]
        document = openai_response(model, "completed", output, OPENAI_RESPONSES_USAGE)
        return Reply(headers=[("content-type", "application/json")], parts=[json.dumps(document).encode()])

    with ScriptedUpstream(handler) as upstream:
        yield upstream


def clients(provider: ScriptedUpstream, log: EventLog, tmp_path: Path) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    bare = openai.AsyncOpenAI(base_url=provider.base_url, api_key="sk-test", max_retries=0)
    return bare, moa_stream.wrap(bare, sinks=[log], trace_dir=tmp_path)


async def raw(client: openai.AsyncOpenAI, model: str) -> bytes:
    async with client.responses.with_streaming_response.create(model=model, input="Say something", stream=True) as r:
        return b"".join([part async for part in r.iter_bytes()])


async def events(client: openai.AsyncOpenAI, model: str) -> list[dict[str, Any]]:
    stream = await client.responses.create(model=model, input="Say something", stream=True)
    return [event.to_dict() async for event in stream]


async def one_call(client: openai.AsyncOpenAI, log: EventLog) -> tuple[moa_stream.CallUsage, moa_stream.CallRecord]:
    await moa_stream.flush(client)
    [call] = log.of(moa_stream.CallUsage)
    [trace] = log.of(moa_stream.TurnTrace)
    [record] = trace.calls
    return call, record


READ_WHOLE = ["openai", "openai-reasoning", "data-only-done", "crlf-keepalive", "split-reads", "ollama-usage"]


@pytest.mark.parametrize("model", READ_WHOLE)
async def test_caller_reads_the_bare_sdks_bytes_and_events(
    provider: ScriptedUpstream, log: EventLog, tmp_path: Path, model: str
) -> None:
    bare, wrapped = clients(provider, log, tmp_path)
    assert await raw(wrapped, model) == await raw(bare, model)
    assert await events(wrapped, model) == await events(bare, model)
    await moa_stream.flush(wrapped)
    assert [(c.api, c.status) for c in log.of(moa_stream.CallUsage)] == [("responses", "completed")] * 2


@pytest.mark.parametrize(
    ("model", "usage", "text"),
    [
        ("openai", (37, 12, 20, 8), " ".join(WORDS)),
        ("openai-reasoning", (37, 12, 20, 8), " ".join(WORDS)),
        ("data-only-done", (37, 12, 20, 8), " ".join(WORDS)),
        ("crlf-keepalive", (37, 12, 20, 8), " ".join(WORDS)),
        ("split-reads", (37, 12, 20, 8), " ".join(WIDE_WORDS)),
        ("ollama-usage", (30, None, 6, None), " ".join(WORDS)),
    ],
)
async def test_usage_and_output_come_from_the_providers_events(
    provider: ScriptedUpstream,
    log: EventLog,
    tmp_path: Path,
    model: str,
    usage: tuple[int, int | None, int, int | None],
    text: str,
) -> None:
    _, wrapped = clients(provider, log, tmp_path)
    stream = await wrapped.responses.create(model=model, input="Say something", stream=True)
    async for _ in stream:
        pass
    call, record = await one_call(wrapped, log)
    assert (call.status, call.usage_source, call.error) == ("completed", "reported", None)
    assert (call.input_tokens, call.cached_input_tokens, call.output_tokens, call.reasoning_tokens) == usage
    assert (record.output.text, record.response_id) == (text, RESPONSE_ID)
    assert record.output.reasoning == ("".join(SUMMARY) if model == "openai-reasoning" else "")


async def test_a_whole_response_is_metered_from_its_body(
    provider: ScriptedUpstream, log: EventLog, tmp_path: Path
) -> None:
    _, wrapped = clients(provider, log, tmp_path)
    response = await wrapped.responses.create(model="openai", input="Say something")
    call, record = await one_call(wrapped, log)
    assert (call.status, call.input_tokens, call.cached_input_tokens, call.output_tokens) == ("completed", 37, 12, 20)
    assert record.output.text == response.output_text


async def test_usage_null_at_the_end_is_estimated(provider: ScriptedUpstream, log: EventLog, tmp_path: Path) -> None:
    _, wrapped = clients(provider, log, tmp_path)
    stream = await wrapped.responses.create(model="usage-null", input="Say something", stream=True)
    async for _ in stream:
        pass
    call, _ = await one_call(wrapped, log)
    assert (call.status, call.usage_source) == ("completed", "estimated")
    assert call.output_tokens == len(WORDS)


@pytest.mark.parametrize(
    ("model", "status", "finish", "error"),
    [
        ("incomplete", "completed", "max_output_tokens", None),
        ("failed", "error", "failed", "The model failed to finish its answer."),
        ("error-event", "error", None, "An error occurred while processing your request."),
        ("cut", "error", None, "the stream ended before its terminal event"),
    ],
)
async def test_an_unfinished_answer_ends_the_call_with_the_providers_reason(
    provider: ScriptedUpstream,
    log: EventLog,
    tmp_path: Path,
    model: str,
    status: str,
    finish: str | None,
    error: str | None,
) -> None:
    bare, wrapped = clients(provider, log, tmp_path)
    assert await events(wrapped, model) == await events(bare, model)  # the SDK hands each event on
    call, _ = await one_call(wrapped, log)
    assert (call.status, call.finish_reason) == (status, finish)
    if error is None:
        assert call.error is None
    else:
        assert call.error is not None
        assert error in call.error
