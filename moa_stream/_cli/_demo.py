"""`moa-stream demo`: one Mixture-of-Agents turn, shown live, on the embedded simulator or a real endpoint."""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TextIO

import anyio
import openai
from openai.types.chat import ChatCompletionMessageParam

from .._config import load_config
from .._events import Aggregating, CallUsage, Event, ReferenceDone, ReferenceStarted, TurnTrace
from .._presets import Preset, Slot, self_moa
from .._session import session
from .._wrap import wrap
from ..testing import default_simulator, sim_client
from ._local import LOCAL_MODEL, LocalServer

SIM_PRESET = Preset(references=["sim-small", "sim-medium", "sim-reasoner"], aggregator="sim-large")
QUESTION = "In two sentences: why do streaming APIs need careful resource cleanup?"
DemoApi = Literal["chat", "responses"]
"""The API the demo asks its turn through: chat completions, or the Responses API."""

# SmolLM2-135M three times over, made to differ by temperature and instruction; the token limits keep
# a turn (four generations, one at a time in the server) to well under a minute on two CPU cores.
LOCAL_PRESET = Preset(
    references=[
        Slot(model=LOCAL_MODEL, label="plain", temperature=0.2, max_tokens=96),
        Slot(
            model=LOCAL_MODEL, label="example", temperature=0.7, max_tokens=96, system="Answer with a concrete example."
        ),
        Slot(model=LOCAL_MODEL, label="skeptic", temperature=1.0, max_tokens=96, system="Point out what can go wrong."),
    ],
    aggregator=Slot(
        model=LOCAL_MODEL,
        label="aggregator",
        temperature=0.3,
        max_tokens=160,
        system="Combine the answers into one short, correct reply.",
    ),
)


def demo_presets(
    *, base_url: str | None, models: Sequence[str], aggregator: str | None, config: Path | None
) -> dict[str, Preset]:
    """The presets the demo may run: from --config, else built from --model/--aggregator."""
    if config is not None:
        return load_config(config)
    if base_url is None and not models:
        return {"demo": SIM_PRESET}
    models = list(models) or ["gpt-4.1-mini"]
    references = self_moa(models[0], 3) if len(models) == 1 else models
    return {"demo": Preset(references=references, aggregator=aggregator or models[0])}


async def run_demo(
    *,
    base_url: str | None,
    api_key: str | None,
    models: Sequence[str] = (),
    aggregator: str | None = None,
    config: Path | None = None,
    preset: str | None = None,
    presets: Mapping[str, Preset] | None = None,
    trace_dir: Path,
    session_id: str = "demo",
    api: DemoApi = "chat",
    out: TextIO = sys.stdout,
) -> list[CallUsage]:
    """Run one MoA turn with a progress line per reference, stream the aggregator's answer, then
    print every call's usage and where the trace file is. `presets` replaces the ones `demo_presets`
    would build; `api` is the API the turn is asked through (chat completions or Responses)."""
    if presets is None:
        presets = demo_presets(base_url=base_url, models=models, aggregator=aggregator, config=config)
    name = preset or next(iter(presets), "")
    if name not in presets:
        raise SystemExit(f"moa-stream demo: no preset {name!r}; the presets are: {', '.join(presets) or 'none'}")
    if base_url is None:
        upstream = sim_client(default_simulator())
        where = "the embedded simulator"
    else:
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        upstream = openai.AsyncOpenAI(base_url=base_url, api_key=key)
        where = base_url

    events: list[Event] = []
    progress: queue.SimpleQueue[Event | None] = queue.SimpleQueue()

    def sink(event: Event) -> None:
        events.append(event)
        progress.put(event)

    client = wrap(upstream, sinks=[sink], trace_dir=trace_dir, presets=presets)
    through = " through the Responses API" if api == "responses" else ""
    print(f"moa_stream demo: preset moa:{name} against {where}{through}\n\n> {QUESTION}\n", file=out, flush=True)
    with session(session_id) as sid:
        async with client, anyio.create_task_group() as tasks:
            tasks.start_soon(_show_progress, progress, out)
            try:
                await _stream_answer(client, f"moa:{name}", api, out)
                print("\n", file=out)
            finally:
                progress.put(None)  # stops the progress printer
        # leaving `async with client` drained every event and trace line
    calls = [e for e in events if isinstance(e, CallUsage)]
    print(format_calls(calls), file=out)
    turns = sum(isinstance(e, TurnTrace) for e in events)
    print(f"\n{turns} turn traced in {trace_dir / f'{sid}.jsonl'}", file=out)
    return calls


async def _stream_answer(client: openai.AsyncOpenAI, model: str, api: DemoApi, out: TextIO) -> None:
    """Ask for the turn through `api` and print the answer's text as it streams."""
    if api == "responses":
        events = await client.responses.create(model=model, input=QUESTION, stream=True)
        async with events:
            async for event in events:
                if event.type == "response.output_text.delta":
                    print(event.delta, end="", file=out, flush=True)
        return
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    # The usage chunk is asked for as any caller who shows usage would.
    chunks = await client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    async with chunks:
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", file=out, flush=True)


async def run_local_demo(*, trace_dir: Path, api: DemoApi = "chat", out: TextIO = sys.stdout) -> list[CallUsage]:
    """The demo on SmolLM2-135M served by llama.cpp on loopback (the `local` extra), started and stopped here."""
    async with LocalServer() as server:
        print(f"llama.cpp serves {server.gguf.name} as {server.model!r} at {server.base_url}", file=out, flush=True)
        return await run_demo(
            base_url=server.base_url,
            api_key="none",
            presets={"local": LOCAL_PRESET},
            trace_dir=trace_dir,
            api=api,
            out=out,
        )


async def _show_progress(progress: queue.SimpleQueue[Event | None], out: TextIO) -> None:
    while (event := await anyio.to_thread.run_sync(progress.get)) is not None:
        if isinstance(event, ReferenceStarted):
            line = f"  reference {event.label} ({event.model}) started"
        elif isinstance(event, ReferenceDone):
            line = f"  reference {event.label}: {event.status} ({event.done}/{event.total} done)"
        elif isinstance(event, Aggregating):
            line = f"  aggregating {event.references_used}/{event.references_total} answers with {event.model}\n"
        else:
            continue
        print(line, file=out, flush=True)


def format_calls(calls: Sequence[CallUsage]) -> str:
    """A fixed-width table of usage events, one row per call."""
    header = ("role", "model", "in", "out", "usage", "cost $", "ttft s", "time s", "status")
    rows = [header]
    for call in calls:
        rows.append(
            (
                call.role,
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
