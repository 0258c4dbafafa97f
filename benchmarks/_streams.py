"""Readers of one streamed completion each (the variants compared), and the interleaved CPU loop.

A reader streams a completion of a given number of chunks and says how many chunks it saw and when
the first one arrived. `interleaved()` runs every reader once per round, round-robin in an order that
rotates each round, so that drift on a noisy machine hits every variant alike; each sample is the
process's CPU time (`time.process_time()`: every thread, the sink thread included) and the wall time
of a few streams, then the wrapped readers' pending events are flushed inside the same sample.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import openai
from openai.types.chat import ChatCompletionMessageParam

import moa_stream
from moa_stream import Preset
from moa_stream._sdk import default_http_module
from moa_stream.testing import SimModel

from ._common import new_client, null_sink, rotated, spread, wrap_client

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count for me"}]


def stream_model(chunks: int) -> str:
    """The simulator model whose streams carry `chunks` chunks (role, content words, finish)."""
    return f"bench-{chunks}"


def stream_models(sizes: Sequence[int]) -> list[SimModel]:
    """Zero-latency models for `sizes`: a role chunk, `n - 2` words and a finish chunk make n chunks
    (plus a usage chunk when asked for, which the wrapped client strips again)."""
    return [SimModel(name=stream_model(n), reply_tokens=max(1, n - 2)) for n in sizes]


def moa_presets(sizes: Sequence[int]) -> dict[str, Preset]:
    """One reference and an aggregator, both of `n` chunks, per size: `moa:chunks-<n>`."""
    return {
        f"chunks-{n}": Preset(references=[stream_model(n)], aggregator=stream_model(n), cadence="per_call")
        for n in sizes
    }


@dataclasses.dataclass(frozen=True)
class Stream:
    chunks: int
    ttft_s: float


class Reader:
    """One variant: streams a completion of `size` chunks; `settle()` waits for its events."""

    name: str = ""

    async def read(self, size: int) -> Stream:
        raise NotImplementedError

    async def settle(self) -> None:
        """Deliver pending events and trace lines (a no-op for unwrapped readers)."""

    async def aclose(self) -> None:
        raise NotImplementedError


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta


class _Chunk(msgspec.Struct):
    choices: list[_Choice]


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class FloorReader(Reader):
    """The floor: the SDK's HTTP client reads the SSE bytes, split on blank lines, and msgspec decodes
    each chunk into a small typed Struct. No SDK objects, no metering: the least a reader can do."""

    def __init__(self, base_url: str, *, name: str = "floor") -> None:
        self.name = name
        self._url = f"{base_url}/chat/completions"
        self._http: Any = default_http_module().AsyncClient(timeout=60)

    async def read(self, size: int) -> Stream:
        body = {"model": stream_model(size), "messages": MESSAGES, "stream": True}
        chunks = 0
        ttft = 0.0
        started = time.perf_counter()
        async with self._http.stream("POST", self._url, json=body) as response:
            pending = b""
            async for data in response.aiter_bytes():
                *events, pending = (pending + data).split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: ") and event != b"data: [DONE]":
                        _decode_chunk(event[6:])
                        chunks += 1
                        if chunks == 1:
                            ttft = time.perf_counter() - started
        return Stream(chunks, ttft)

    async def aclose(self) -> None:
        await self._http.aclose()


class SdkReader(Reader):
    """`client.chat.completions.create(stream=True)` read to its end, bare or wrapped."""

    def __init__(self, name: str, client: openai.AsyncOpenAI, *, wrapped: bool) -> None:
        self.name = name
        self.client = client
        self._wrapped = wrapped

    def model(self, size: int) -> str:
        return stream_model(size)

    async def read(self, size: int) -> Stream:
        chunks = 0
        ttft = 0.0
        started = time.perf_counter()
        stream = await self.client.chat.completions.create(model=self.model(size), messages=MESSAGES, stream=True)
        async with stream:
            async for _ in stream:
                chunks += 1
                if chunks == 1:
                    ttft = time.perf_counter() - started
        return Stream(chunks, ttft)

    async def settle(self) -> None:
        if self._wrapped:
            await moa_stream.flush(self.client)

    async def aclose(self) -> None:
        await self.client.close()


class MoaReader(SdkReader):
    """A `moa:chunks-<n>` turn: one reference read to its end, then the aggregator's n chunks streamed
    to the caller (`chunks` and TTFT are the aggregator's; CPU includes the reference)."""

    def model(self, size: int) -> str:
        return f"moa:chunks-{size}"


def sdk_reader(
    name: str,
    base_url: str,
    *,
    wrapped: bool = True,
    fast: bool = False,
    sinks: bool = True,
    trace_dir: Path | None = None,
    presets: Mapping[str, Preset] | None = None,
) -> SdkReader:
    """A reader over a new client: bare, or wrapped with (by default) a null sink and a trace dir."""
    client = new_client(base_url)
    if not wrapped:
        return SdkReader(name, client, wrapped=False)
    options: dict[str, Any] = {"presets": presets} if presets else {}
    if sinks:
        options["sinks"] = [null_sink]
        options["trace_dir"] = trace_dir
    wrapped_client = wrap_client(client, fast=fast, **options)
    cls = MoaReader if presets else SdkReader
    return cls(name, wrapped_client, wrapped=True)


@dataclasses.dataclass(frozen=True)
class Sample:
    """A few streams of one reader, back to back, and the flush of its events."""

    cpu_s: float
    wall_s: float
    chunks: int
    ttft_s: float
    """Median TTFT of the sample's streams."""

    @property
    def cpu_us_per_chunk(self) -> float:
        return self.cpu_s / self.chunks * 1e6

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.wall_s


async def interleaved(readers: Sequence[Reader], size: int, *, rounds: int, streams: int) -> dict[str, list[Sample]]:
    """`rounds` samples of `streams` streams of `size` chunks per reader, interleaved and rotated."""
    for reader in readers:  # warm up connections, caches and code paths
        await reader.read(size)
        await reader.settle()
    samples: dict[str, list[Sample]] = {reader.name: [] for reader in readers}
    for round_index in range(rounds):
        for reader in rotated(readers, round_index):
            gc.collect()
            cpu, wall = time.process_time(), time.perf_counter()
            chunks = 0
            ttfts = []
            for _ in range(streams):
                stream = await reader.read(size)
                chunks += stream.chunks
                ttfts.append(stream.ttft_s)
            await reader.settle()
            samples[reader.name].append(
                Sample(
                    cpu_s=time.process_time() - cpu,
                    wall_s=time.perf_counter() - wall,
                    chunks=chunks,
                    ttft_s=statistics.median(ttfts),
                )
            )
    return samples


def summarize(samples: Mapping[str, Sequence[Sample]], *, baseline: str = "bare") -> dict[str, dict[str, Any]]:
    """Per reader: CPU µs per chunk, chunks/s and TTFT (median, min, max over rounds), TTFT added to
    the baseline's (difference of medians), and the CPU ratio to the baseline, both as the ratio of
    the medians and as the spread of the per-round (paired) ratios."""
    base = samples[baseline]
    base_cpu = statistics.median(s.cpu_us_per_chunk for s in base)
    base_ttft = statistics.median(s.ttft_s for s in base)
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        cpu = [s.cpu_us_per_chunk for s in runs]
        ttft_ms = [s.ttft_s * 1e3 for s in runs]
        summary[name] = {
            "cpu_us_per_chunk": spread(cpu),
            "chunks_per_s": spread([s.chunks_per_s for s in runs]),
            "ttft_ms": spread(ttft_ms),
            "added_ttft_ms": statistics.median(ttft_ms) - base_ttft * 1e3,
            "cpu_over_bare": statistics.median(cpu) / base_cpu,
            "cpu_over_bare_paired": spread(
                [s.cpu_us_per_chunk / b.cpu_us_per_chunk for s, b in zip(runs, base, strict=True)]
            ),
            "chunks_per_sample": runs[0].chunks,
            "rounds": len(runs),
        }
    return summary


def streams_per_sample(size: int, target_chunks: int) -> int:
    """Enough back-to-back streams that a sample holds about `target_chunks` chunks."""
    return max(1, round(target_chunks / size))
