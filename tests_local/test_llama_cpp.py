"""moa_stream against a real model server: llama.cpp with SmolLM2-135M, the real openai client, real HTTP.

The server streams no usage chunk (even with `include_usage`), so streamed calls are metered by the
estimate; non-streamed responses carry the server's own token counts, which the estimate is held to.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

import moa_stream
from moa_stream import CallUsage, Preset, Slot, TurnEnd
from moa_stream._cli._local import LOCAL_MODEL, LocalServer

from .conftest import EventLog

Wrapped = Callable[..., openai.AsyncOpenAI]

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Why do streaming APIs need careful resource cleanup?"},
]
# Greedy decoding with a fixed seed: streamed and non-streamed calls produce the same text, so their
# token counts are comparable.
GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 7, "max_tokens": 64}

# The estimate for a streamed call counts one output token per content chunk, and llama.cpp sends one
# chunk per token, so it must be within 2 tokens of the count the server reports for the same text.
# Input is estimated from characters (4 per token plus chat-format overhead), not by the model's
# tokenizer: within 30% of the server's prompt count.
OUTPUT_TOLERANCE_TOKENS = 2
INPUT_TOLERANCE = 0.30

PAIR = Preset(
    references=[
        Slot(model=LOCAL_MODEL, label="plain", temperature=0.2, seed=1, max_tokens=32),
        Slot(model=LOCAL_MODEL, label="example", temperature=0.9, seed=2, max_tokens=32, system="Give an example."),
    ],
    aggregator=Slot(model=LOCAL_MODEL, temperature=0.0, seed=3, max_tokens=48),
)


def content(chunk: Any) -> str:
    return str(chunk.choices[0].delta.content or "") if chunk.choices else ""


async def test_non_streaming_pass_through_meters_the_servers_reported_usage(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped()
    reply = await client.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, **GREEDY)
    assert isinstance(reply, ChatCompletion)
    assert reply.model == LOCAL_MODEL
    assert reply.choices[0].message.content
    assert reply.usage is not None
    await moa_stream.flush(client)
    [call] = log.of(CallUsage)
    assert (call.role, call.model, call.provider, call.status) == ("direct", LOCAL_MODEL, "127.0.0.1", "completed")
    assert call.usage_source == "reported"
    assert (call.input_tokens, call.output_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


async def test_streamed_usage_is_estimated_close_to_the_servers_count_for_the_same_output(
    upstream: openai.AsyncOpenAI, wrapped: Wrapped, log: EventLog, tmp_path: Path
) -> None:
    reference = await upstream.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, **GREEDY)
    assert reference.usage is not None
    client = wrapped()
    chunks = []
    with moa_stream.session("stream"):
        stream = await client.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, stream=True, **GREEDY)
        async with stream:
            chunks = [chunk async for chunk in stream]
    text = "".join(content(chunk) for chunk in chunks)
    assert text == reference.choices[0].message.content  # the same output, so the same token count
    assert all(chunk.usage is None for chunk in chunks)  # the caller did not ask for usage
    await moa_stream.flush(client)
    [call] = log.of(CallUsage)
    assert (call.status, call.usage_source, call.finish_reason) == ("completed", "estimated", "length")
    assert call.output_tokens is not None
    assert call.input_tokens is not None
    reported = reference.usage
    print(  # the figures the README quotes
        f"\noutput tokens: estimated {call.output_tokens}, reported {reported.completion_tokens}; "
        f"input tokens: estimated {call.input_tokens}, reported {reported.prompt_tokens}"
    )
    assert abs(call.output_tokens - reported.completion_tokens) <= OUTPUT_TOLERANCE_TOKENS
    assert math.isclose(call.input_tokens, reported.prompt_tokens, rel_tol=INPUT_TOLERANCE)
    [trace] = moa_stream.read_traces(tmp_path / "traces" / "stream.jsonl")
    [record] = trace.calls
    assert (record.output.text, record.output_source) == (text, "inline_from_stream")
    assert record.usage == call


async def test_a_moa_turn_streams_the_aggregators_answer_and_is_traced(
    wrapped: Wrapped, log: EventLog, tmp_path: Path
) -> None:
    client = wrapped(presets={"pair": PAIR})
    with moa_stream.session("moa"):
        stream = await client.chat.completions.create(model="moa:pair", messages=MESSAGES, stream=True)
        async with stream:
            answer = "".join([content(chunk) async for chunk in stream])
    assert answer.strip()
    await moa_stream.flush(client)
    calls = log.of(CallUsage)
    assert sorted((c.role, c.label) for c in calls) == [
        ("aggregator", LOCAL_MODEL),
        ("reference", "example"),
        ("reference", "plain"),
    ]
    assert all((c.status, c.usage_source, c.model) == ("completed", "estimated", LOCAL_MODEL) for c in calls)
    [end] = log.of(TurnEnd)
    assert (end.calls, end.failed_calls, end.status) == (3, 0, "completed")
    # Estimated usage counts as known: the turn's totals are complete, and are the calls' sum.
    assert end.usage_complete
    assert end.output_tokens == sum(c.output_tokens or 0 for c in calls)
    [trace] = moa_stream.read_traces(tmp_path / "traces" / "moa.jsonl")
    assert (trace.model, trace.preset) == ("moa:pair", "pair")
    aggregator = trace.calls[-1]
    assert (aggregator.role, aggregator.output.text) == ("aggregator", answer)
    # The aggregator saw both references' answers.
    seen = str(aggregator.input_messages)
    assert all(record.output.text.strip() in seen for record in trace.calls[:-1])


async def test_breaking_off_a_stream_is_metered_as_closed_early_and_frees_the_server(
    wrapped: Wrapped, log: EventLog
) -> None:
    client = wrapped()
    seen = 0
    stream = await client.chat.completions.create(
        model=LOCAL_MODEL, messages=MESSAGES, stream=True, **{**GREEDY, "max_tokens": 200}
    )
    async with stream:
        async for chunk in stream:
            seen += bool(content(chunk))
            if seen == 3:
                break
    await moa_stream.flush(client)
    [call] = log.of(CallUsage)
    assert (call.status, call.usage_source, call.output_tokens) == ("closed_early", "estimated", 3)
    # The server noticed the closed connection and stopped generating: the next call is answered.
    with anyio.fail_after(60):
        reply = await client.chat.completions.create(
            model=LOCAL_MODEL, messages=MESSAGES, **{**GREEDY, "max_tokens": 4}
        )
    assert reply.choices[0].finish_reason == "length"


async def test_cancelling_the_callers_task_is_metered_as_cancelled(wrapped: Wrapped, log: EventLog) -> None:
    client = wrapped()
    first_token = anyio.Event()

    async def consume() -> None:
        stream = await client.chat.completions.create(
            model=LOCAL_MODEL, messages=MESSAGES, stream=True, **{**GREEDY, "max_tokens": 200}
        )
        async with stream:
            async for chunk in stream:
                if content(chunk):
                    first_token.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(consume)
        await first_token.wait()
        tasks.cancel_scope.cancel()
    await moa_stream.flush(client)
    [call] = log.of(CallUsage)
    assert (call.status, call.usage_source) == ("cancelled", "estimated")
    assert call.output_tokens is not None
    assert 1 <= call.output_tokens < 200


async def test_the_server_stops_on_aclose_and_cannot_be_reused() -> None:
    server = LocalServer(stop_timeout=30.0)
    async with server:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0) as probe:
            assert [model.id for model in (await probe.models.list()).data] == [LOCAL_MODEL]
        assert server.returncode is None
    assert server.returncode is not None
    await server.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await server.__aenter__()
    with pytest.raises(OSError, match="connection attempts failed"):  # nothing listens on the port any more
        await anyio.connect_tcp("127.0.0.1", server.port)


def test_demo_local_command_streams_a_moa_turn_from_smollm2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moa_stream", "demo", "--local", "--trace-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    print(result.stdout)  # shown with -s: the README's excerpt
    assert "3/3 done" in result.stdout
    assert f"aggregating 3/3 answers with {LOCAL_MODEL}" in result.stdout
    table = result.stdout.split("---------")[-1]
    assert table.count("completed") == 4
    assert table.count("estimated") == 4
    [trace] = moa_stream.read_traces(tmp_path / "demo.jsonl")
    assert trace.calls[-1].output.text.strip() in result.stdout


async def test_bench_command_measures_the_llama_cpp_server(llama: LocalServer, tmp_path: Path) -> None:
    (tmp_path / "moa.toml").write_text(
        f'[presets.pair]\nreferences = ["{LOCAL_MODEL}", "{LOCAL_MODEL}"]\naggregator = "{LOCAL_MODEL}"\n'
    )
    argv = ["--base-url", llama.base_url, "--model", LOCAL_MODEL, "--concurrency", "1", "2", "--requests", "2"]
    argv += ["--max-tokens", "8", "--config", str(tmp_path / "moa.toml"), "--out-dir", str(tmp_path / "out")]
    # A child process, as users run it; awaited, so that the server's event loop keeps running.
    with anyio.fail_after(600):
        result = await anyio.run_process([sys.executable, "-m", "moa_stream", "bench", *argv], check=False)
    print(result.stdout.decode())  # shown with -s: the table
    assert result.returncode == 0, result.stderr.decode()
    document = json.loads((tmp_path / "out" / "endpoint.json").read_text())
    assert list(document["results"]["levels"]) == ["1", "2"]
    for entry in document["results"]["levels"].values():
        assert {"bare", "wrapped", "moa:pair", "aggregator"} <= set(entry["variants"])
        for row in entry["variants"].values():
            assert (row["ok"], row["errors"]) == (2, 0)
            assert row["ttft_ms"]["p50"] <= row["e2el_ms"]["p50"]
            # The server sends no usage chunk: tokens are counted from the chunks that carried text.
            assert row["output_tokens"]["from_chunks"] == 2
            assert 2 <= row["output_tokens"]["total"] <= 2 * 8
    assert any("had no usage chunk" in note for note in document["notes"])
    assert document["results"]["preset"]["levels"]["1"]["aggregator_ttft_p50_ms"] is not None
