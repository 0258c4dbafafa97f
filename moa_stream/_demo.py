"""`moa-stream demo`: metered calls on the embedded simulator (or a real endpoint), shown live."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import anyio
import openai
from openai.types.chat import ChatCompletionMessageParam

from ._events import CallUsage, Event, TurnTrace
from ._session import session
from ._sim import default_simulator
from ._sim_transport import sim_client
from ._wrap import wrap

SIM_MODELS = ("sim-medium", "sim-small", "sim-large", "sim-reasoner")
QUESTION = "In two sentences: why do streaming APIs need careful resource cleanup?"


async def run_demo(
    *,
    base_url: str | None,
    api_key: str | None,
    models: Sequence[str],
    trace_dir: Path,
    session_id: str = "demo",
    out: TextIO = sys.stdout,
) -> list[CallUsage]:
    """Stream one answer live, make a streamed, a non-streamed and a broken-off call side by side,
    then print every call's usage event and where the trace file is."""
    if base_url is None:
        upstream = sim_client(default_simulator())
        models = models or SIM_MODELS
        where = "the embedded simulator"
    else:
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        upstream = openai.AsyncOpenAI(base_url=base_url, api_key=key)
        models = models or ("gpt-4.1-mini",)
        where = base_url
    events: list[Event] = []
    client = wrap(upstream, sinks=[events.append], trace_dir=trace_dir)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    first, rest = models[0], list(models[1:]) or [models[0]]
    others = [rest[i % len(rest)] for i in range(max(3, len(rest)))]

    print(f"moa_stream demo against {where}\n\n> {QUESTION}\n\n[{first}] ", end="", file=out, flush=True)
    with session(session_id) as sid:
        async with client:
            stream = await client.chat.completions.create(model=first, messages=messages, stream=True)
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        print(chunk.choices[0].delta.content, end="", file=out, flush=True)
            print(f"\n\nThen {len(others)} calls at once: streamed, non-streamed, broken off after 3 chunks.", file=out)
            async with anyio.create_task_group() as tg:
                for index, model in enumerate(others):
                    tg.start_soon(_side_call, client, model, messages, index % 3)
        # leaving `async with client` drained every event and trace line
    calls = [e for e in events if isinstance(e, CallUsage)]
    print(file=out)
    print(format_calls(calls), file=out)
    turns = sum(isinstance(e, TurnTrace) for e in events)
    print(f"\n{turns} turns traced in {trace_dir / f'{sid}.jsonl'}", file=out)
    return calls


async def _side_call(
    client: openai.AsyncOpenAI, model: str, messages: list[ChatCompletionMessageParam], kind: int
) -> None:
    if kind == 1:
        await client.chat.completions.create(model=model, messages=messages)
        return
    stream = await client.chat.completions.create(model=model, messages=messages, stream=True)
    async with stream:
        count = 0
        async for _ in stream:
            count += 1
            if kind == 2 and count == 3:
                break


def format_calls(calls: Sequence[CallUsage]) -> str:
    """A fixed-width table of usage events, one row per call."""
    header = ("model", "in", "out", "usage", "cost $", "ttft s", "time s", "status")
    rows = [header]
    for call in calls:
        rows.append(
            (
                call.model,
                _num(call.input_tokens),
                _num(call.output_tokens),
                call.usage_source,
                "unknown" if call.cost_usd is None else f"{call.cost_usd:.6f}",
                "-" if call.ttft_s is None else f"{call.ttft_s:.3f}",
                f"{call.duration_s:.3f}",
                call.status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)
