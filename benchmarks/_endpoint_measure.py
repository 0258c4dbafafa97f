"""Measuring an endpoint: one streamed request, a block of them with `c` in flight, and a level of
blocks interleaved across the variants; then the figures of a level (see `endpoint.py` for what they
mean and which tools define them the same way).

A block's CPU is `time.process_time()` (every thread of this process, the sink thread included) from
the first request of the block to the end of the flush of its events; its wall time ends with its
last request, before the flush, so throughput is what the caller saw.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

import anyio
import openai

import moa_stream

from ._common import percentile, rotated

INCLUDE_USAGE: Final = {"include_usage": True}
"""Asked of every variant, the bare SDK too, so that all of them receive and parse the same chunks."""
MAX_ROUNDS = 5
"""Blocks per variant and level at most: enough rotations to spread drift, few enough that each
block holds at least `c` requests (then the level really has `c` in flight)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One of the clients compared: its name in the results, the client, the model it asks for, and
    the rest of its request (messages, max_tokens, and any overrides of a preset's aggregator)."""

    name: str
    client: openai.AsyncOpenAI
    model: str
    request: Mapping[str, Any]
    wrapped: bool

    async def settle(self) -> None:
        """Deliver the wrapped client's pending events (inside the block's CPU time)."""
        if self.wrapped:
            await moa_stream.flush(self.client)


@dataclasses.dataclass(slots=True)
class RequestRecord:
    """What one streamed request measured, in seconds from just before `create()` was called."""

    ttft_s: float | None = None
    """To the first chunk that carries text (content, or reasoning_content); None when none did."""
    e2el_s: float = 0.0
    """To the end of the stream (after its usage chunk), or to the error."""
    itl_s: list[float] = dataclasses.field(default_factory=list)
    """The gaps between consecutive chunks that carry text."""
    chunks: int = 0
    """Every chunk the caller read (the role chunk, the finish chunk and the usage chunk included)."""
    text_chunks: int = 0
    usage_tokens: int | None = None
    """`completion_tokens` of the stream's usage chunk, when it sent one."""
    error: str | None = None
    exception: Exception | None = None

    @property
    def output_tokens(self) -> int:
        """From the usage chunk; else the chunks that carried text (one token each, as servers send them)."""
        return self.text_chunks if self.usage_tokens is None else self.usage_tokens


def _carries_text(chunk: Any) -> bool:
    if not chunk.choices:
        return False
    delta = chunk.choices[0].delta
    return bool(delta.content) or bool(getattr(delta, "reasoning_content", None))


async def measure(variant: Variant) -> RequestRecord:
    """Stream one completion to its end; an error is recorded, not raised."""
    record = RequestRecord()
    create: Any = variant.client.chat.completions.create  # its overloads do not take **request
    started = last = time.perf_counter()
    try:
        stream = await create(model=variant.model, stream=True, stream_options=INCLUDE_USAGE, **variant.request)
        async with stream:
            async for chunk in stream:
                now = time.perf_counter()
                record.chunks += 1
                if chunk.usage is not None and chunk.usage.completion_tokens is not None:
                    record.usage_tokens = chunk.usage.completion_tokens
                if _carries_text(chunk):
                    if record.ttft_s is None:
                        record.ttft_s = now - started
                    else:
                        record.itl_s.append(now - last)
                    last = now
                    record.text_chunks += 1
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        record.exception = exc
    record.e2el_s = time.perf_counter() - started
    return record


@dataclasses.dataclass(frozen=True)
class Block:
    """Requests of one variant run with `c` in flight, back to back, and what they cost."""

    records: list[RequestRecord]
    cpu_s: float
    wall_s: float


async def run_block(variant: Variant, count: int, in_flight: int) -> Block:
    """`count` requests, `in_flight` workers taking the next one as each finishes; then the flush."""
    records: list[RequestRecord] = []
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            records.append(await measure(variant))

    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for _ in range(min(in_flight, count)):
            tasks.start_soon(worker)
    wall_s = time.perf_counter() - wall
    await variant.settle()
    return Block(records=records, cpu_s=time.process_time() - cpu, wall_s=wall_s)


def block_sizes(requests: int, concurrency: int) -> list[int]:
    """`requests` split into up to `MAX_ROUNDS` blocks of at least `concurrency` each (one block when
    there are fewer requests than that), as even as they go."""
    rounds = max(1, min(MAX_ROUNDS, requests // concurrency))
    return [requests // rounds + (1 if index < requests % rounds else 0) for index in range(rounds)]


class Progress:
    """A progress bar on stderr, `[#####-----] 40/96 requests  concurrency 4  12 s, ~18 s left`,
    redrawn in place with `\\r` when stderr is a terminal and silent otherwise (a log file or a pipe
    gets the table alone). It is only redrawn between blocks, so that it costs nothing inside a
    measurement."""

    WIDTH: Final = 24
    """Characters of the bar itself."""

    def __init__(self, total: int, *, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._on = self._stream.isatty()
        self._started = time.perf_counter()
        self._width = 0

    def line(self, label: str) -> str:
        """The bar as drawn now."""
        share = min(1.0, self.done / self.total) if self.total else 1.0
        filled = round(share * self.WIDTH)
        elapsed = time.perf_counter() - self._started
        # A guess from the rate so far; a level with more in flight may go faster or slower.
        left = f", ~{elapsed / self.done * (self.total - self.done):.0f} s left" if 0 < self.done < self.total else ""
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        return f"[{bar}] {self.done}/{self.total} requests  {label}  {elapsed:.0f} s{left}"

    def advance(self, count: int, label: str) -> None:
        self.done += count
        if self._on:
            line = self.line(label)
            self._stream.write("\r" + line.ljust(self._width))
            self._stream.flush()
            self._width = len(line)

    def close(self) -> None:
        """Erase the bar, so that what follows starts on a clean line."""
        if self._on and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0


async def run_level(
    variants: Sequence[Variant], concurrency: int, requests: int, progress: Progress
) -> dict[str, list[Block]]:
    """`requests` per variant at `concurrency`, block by block, in an order that rotates each round."""
    blocks: dict[str, list[Block]] = {variant.name: [] for variant in variants}
    for round_index, size in enumerate(block_sizes(requests, concurrency)):
        for variant in rotated(variants, round_index):
            blocks[variant.name].append(await run_block(variant, size, concurrency))
            progress.advance(size, f"concurrency {concurrency}")
    return blocks


# -- figures ----------------------------------------------------------------------------------------


QUANTILES: Final = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
"""The percentiles in the JSON: those vLLM, GenAI-Perf and LLMPerf report in common (the table shows p50, p99)."""


def distribution(values: Sequence[float], *, scale: float = 1.0) -> dict[str, float | int | None]:
    """Mean, `QUANTILES` (nearest rank), min and max of `values` times `scale`, and how many there were."""
    if not values:
        return {"n": 0, "mean": None, **dict.fromkeys(QUANTILES), "min": None, "max": None}
    scaled = [value * scale for value in values]
    return {
        "n": len(scaled),
        "mean": statistics.fmean(scaled),
        **{name: percentile(scaled, q) for name, q in QUANTILES.items()},
        "min": min(scaled),
        "max": max(scaled),
    }


def summarize(blocks: Sequence[Block]) -> dict[str, Any]:
    """The figures of one variant at one level (latencies in ms, rates per second of wall time)."""
    records = [record for block in blocks for record in block.records]
    ok = [record for record in records if record.error is None]
    cpu_s = sum(block.cpu_s for block in blocks)
    wall_s = sum(block.wall_s for block in blocks)
    chunks = sum(record.chunks for record in records)
    tokens = [record.output_tokens for record in ok]
    tpot = [
        (record.e2el_s - record.ttft_s) / (record.output_tokens - 1)
        for record in ok
        if record.ttft_s is not None and record.output_tokens > 1
    ]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "first_error": next((record.error for record in records if record.error), None),
        "rounds": len(blocks),
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None], scale=1e3),
        "itl_ms": distribution([gap for r in ok for gap in r.itl_s], scale=1e3),
        "tpot_ms": distribution(tpot, scale=1e3),
        "e2el_ms": distribution([r.e2el_s for r in ok], scale=1e3),
        "output_tokens": {
            "total": sum(tokens),
            "per_request": distribution(tokens),
            "from_usage": sum(r.usage_tokens is not None for r in ok),
            "from_chunks": sum(r.usage_tokens is None for r in ok),
        },
        "request_output_tokens_per_s": distribution([r.output_tokens / r.e2el_s for r in ok if r.e2el_s > 0]),
        "output_tokens_per_s": sum(tokens) / wall_s if wall_s else None,
        "requests_per_s": len(ok) / wall_s if wall_s else None,
        "chunks": chunks,
        "text_chunks": sum(record.text_chunks for record in records),
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "cpu_us_per_chunk": cpu_s / chunks * 1e6 if chunks else None,
        "cpu_ms_per_call": cpu_s / len(records) * 1e3 if records else None,
    }
