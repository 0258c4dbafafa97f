"""Against providers' exact bytes (an upstream we did not write), the caller reads what the bare SDK
reads, byte for byte, in pass-through and fast mode, while every call is still metered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import moa_stream

from .conftest import EventLog
from .scripted import SSE, Reply, Request, ScriptedUpstream, openai_chunks, sse, vllm_forced_usage_chunks

USER = [{"role": "user", "content": "Say something"}]
WORDS = ["Streams", "carry", "tokens", "one", "by", "one."]


@pytest.fixture(params=[False, True], ids=["passthrough", "fast"])
def fast(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def raw_stream(client: openai.AsyncOpenAI, model: str, **options: Any) -> bytes:
    """The bytes of a streamed chat response as the caller's SDK receives them."""
    async with client.chat.completions.with_streaming_response.create(
        model=model, messages=USER, stream=True, **options
    ) as response:
        return b"".join([part async for part in response.iter_bytes()])


# openai 2.x's own construction leaves fields it does not know (OpenAI's `obfuscation`) out of
# `model_fields_set`, where fast mode's validation counts them: the one known difference.
FIELDS_SET_DIFFERS_IN_FAST_MODE = openai.__version__.startswith("2.")


async def chunk_dicts(
    client: openai.AsyncOpenAI, model: str, *, fields_set: bool = True
) -> list[tuple[dict[str, Any], set[str]]]:
    stream = await client.chat.completions.create(model=model, messages=USER, stream=True)  # type: ignore[arg-type]
    return [(chunk.to_dict(), set(chunk.model_fields_set) if fields_set else set()) async for chunk in stream]


@pytest.fixture
def provider() -> Iterator[ScriptedUpstream]:
    def handler(request: Request) -> Reply:
        model = request.json()["model"]
        chunks = vllm_forced_usage_chunks if model.startswith("vllm") else openai_chunks
        return Reply(headers=SSE, parts=list(chunks(request, WORDS, model=model)))

    with ScriptedUpstream(handler) as upstream:
        yield upstream


def bare_and_wrapped(
    provider: ScriptedUpstream, log: EventLog, tmp_path: Path, *, fast: bool
) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    bare = openai.AsyncOpenAI(base_url=provider.base_url, api_key="sk-test", max_retries=0)
    wrapped = moa_stream.wrap(bare, sinks=[log], trace_dir=tmp_path, fast=fast)
    return bare, wrapped


@pytest.mark.parametrize("model", ["gpt-4o-mini", "vllm-qwen"])
async def test_caller_gets_the_bare_sdks_bytes_on_every_call(
    provider: ScriptedUpstream, log: EventLog, tmp_path: Path, model: str, fast: bool
) -> None:
    bare, wrapped = bare_and_wrapped(provider, log, tmp_path, fast=fast)
    expected = await raw_stream(bare, model)
    for _ in range(3):  # the first call teaches the wrapper what the upstream sends unasked
        assert await raw_stream(wrapped, model) == expected
    await wrapped.close()
    assert len(log.of(moa_stream.CallUsage)) == 3


async def test_usage_null_added_by_asking_for_usage_is_not_seen_by_the_caller(
    provider: ScriptedUpstream, log: EventLog, tmp_path: Path, fast: bool
) -> None:
    bare, wrapped = bare_and_wrapped(provider, log, tmp_path, fast=fast)
    expected = await chunk_dicts(bare, "gpt-4o-mini")
    assert all("usage" not in fields and "usage" not in chunk for chunk, fields in expected)
    compare_fields = not (fast and FIELDS_SET_DIFFERS_IN_FAST_MODE)
    if not compare_fields:
        expected = [(chunk, set()) for chunk, _ in expected]
    for _ in range(2):
        assert await chunk_dicts(wrapped, "gpt-4o-mini", fields_set=compare_fields) == expected
    await wrapped.close()
    # the second call asked for usage on the caller's behalf and metered what the upstream reported
    assert provider.requests[-1].asked_usage()
    assert [c.usage_source for c in log.of(moa_stream.CallUsage)] == ["estimated", "reported"]


async def test_usage_an_upstream_always_sends_reaches_the_caller_and_the_meter(
    provider: ScriptedUpstream, log: EventLog, tmp_path: Path, fast: bool
) -> None:
    bare, wrapped = bare_and_wrapped(provider, log, tmp_path, fast=fast)
    bare_usage = [c.usage for c in [c async for c in await bare.chat.completions.create(
        model="vllm-qwen", messages=USER, stream=True)] if c.usage]  # type: ignore[call-overload]  # fmt: skip
    assert len(bare_usage) == 1
    for _ in range(2):
        stream = await wrapped.chat.completions.create(model="vllm-qwen", messages=USER, stream=True)  # type: ignore[arg-type]
        assert [c.usage async for c in stream if c.usage] == bare_usage
    await wrapped.close()
    calls = log.of(moa_stream.CallUsage)
    assert [(c.usage_source, c.input_tokens) for c in calls] == [("reported", 9), ("reported", 9)]
    assert not any(r.asked_usage() for r in provider.requests[1:])  # never asked: it comes anyway


async def test_openai_hosts_are_asked_for_usage_from_the_first_call() -> None:
    from moa_stream._quirks import UpstreamQuirks

    quirks = UpstreamQuirks()
    assert quirks.unasked_usage("https://api.openai.com:443", "gpt-4.1") is not None
    assert quirks.unasked_usage("https://myres.openai.azure.com:443", "gpt-4.1") is not None
    assert quirks.unasked_usage("http://127.0.0.1:8000", "gpt-4.1") is None  # unknown: learned on first use


# -- invalid UTF-8 -------------------------------------------------------------------------------


def broken_utf8_reply(request: Request) -> Reply:
    """Three good events and one whose text holds half of a multibyte character, in one write."""
    good = list(openai_chunks(request, WORDS))[:3]
    bad = sse({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": "caf\u00e9"}, "finish_reason": None}]})  # fmt: skip
    bad = bad.replace("é".encode(), "é".encode()[:1])
    return Reply(headers=SSE, parts=[b"".join([*good, bad]), b"data: [DONE]\n\n"])


async def caller_sees(client: openai.AsyncOpenAI) -> tuple[list[dict[str, Any]], str]:
    got: list[dict[str, Any]] = []
    try:
        async for chunk in await client.chat.completions.create(model="m", messages=USER, stream=True):  # type: ignore[arg-type]
            got.append(chunk.to_dict())
    except Exception as exc:
        return got, type(exc).__name__
    return got, ""


async def test_invalid_utf8_mid_read_gives_the_good_chunks_then_the_sdks_error(
    log: EventLog, tmp_path: Path, fast: bool
) -> None:
    with ScriptedUpstream(broken_utf8_reply) as provider:
        bare, wrapped = bare_and_wrapped(provider, log, tmp_path, fast=fast)
        expected = await caller_sees(bare)
        assert len(expected[0]) == 3
        assert expected[1] == "UnicodeDecodeError"
        assert await caller_sees(wrapped) == expected
        await wrapped.close()
    [call] = log.of(moa_stream.CallUsage)
    assert call.status == "error"
    assert call.error is not None
    assert "UTF-8" in call.error
    [trace] = log.of(moa_stream.TurnTrace)
    assert trace.calls[0].output.text == "Streams carry"  # the good chunks were recorded
