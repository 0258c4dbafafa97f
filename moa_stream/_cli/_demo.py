"""`moa-stream demo`: one Mixture-of-Agents turn, shown live, on the embedded simulator or a real endpoint."""

from __future__ import annotations

import collections
import http
import os
import queue
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TextIO

import anyio
import openai
from openai.types.chat import ChatCompletionMessageParam

from .._config import load_config
from .._events import Aggregating, CallUsage, Event, ReferenceDone, ReferenceStarted, TurnTrace
from .._presets import Preset, Slot, self_moa
from .._redact import url_without_credentials as shown_url
from .._server._command import is_loopback
from .._session import session
from .._wrap import wrap
from ..testing import default_simulator, sim_client
from ._local import LOCAL_MODEL, LocalServer

SIM_PRESET = Preset(references=["sim-small", "sim-medium", "sim-reasoner"], aggregator="sim-large")
QUESTION = "In two sentences: why do streaming APIs need careful resource cleanup?"
DemoApi = Literal["chat", "responses"]
"""The API the demo asks its turn through: chat completions, or the Responses API."""

KEY_ENV = "OPENAI_API_KEY"
"""Where the key for --base-url comes from without --api-key-env (a loopback endpoint may go without)."""

# How long the answer's first token waits for the "aggregating" line: the event is queued before the
# aggregator is asked, so it takes milliseconds; the limit only keeps a dropped event from hanging the demo.
_PROGRESS_GRACE_S = 5.0
_MESSAGE_CHARS = 300

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


class DemoError(Exception):
    """Why the demo stopped, in one line for stderr; `status` is the exit status (2: how it was
    asked, 1: what the endpoint answered)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


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


def demo_api_key(base_url: str, *, api_key: str | None = None, api_key_env: str | None = None) -> str:
    """The key for `base_url`: `api_key`, else `$api_key_env` (which must be set), else `$OPENAI_API_KEY`,
    which only a loopback endpoint (llama.cpp, vLLM, `moa-stream sim`) may go without."""
    if api_key:
        return api_key
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise DemoError(f"--api-key-env {api_key_env}: that environment variable is not set or empty", status=2)
        return key
    key = os.environ.get(KEY_ENV)
    if key:
        return key
    if is_loopback(urllib.parse.urlsplit(base_url).hostname or ""):
        return "none"
    raise DemoError(
        f"${KEY_ENV} is not set, and {shown_url(base_url)} is not on this machine: set it, or name the "
        "variable that holds the key with --api-key-env NAME",
        status=2,
    )


async def run_demo(
    *,
    base_url: str | None,
    api_key: str | None,
    api_key_env: str | None = None,
    models: Sequence[str] = (),
    aggregator: str | None = None,
    config: Path | None = None,
    preset: str | None = None,
    presets: Mapping[str, Preset] | None = None,
    trace_dir: Path,
    session_id: str = "demo",
    api: DemoApi = "chat",
    out: TextIO | None = None,
) -> list[CallUsage]:
    """Run one MoA turn with a progress line per reference, stream the aggregator's answer, then
    print every call's usage and where the trace file is. `presets` replaces the ones `demo_presets`
    would build; `api` is the API the turn is asked through (chat completions or Responses); `out`
    is where it all goes (default: stdout, as it is when called).

    Raises `DemoError` for a turn that fails (one line naming the URL and what came back) and for
    a missing key or preset. The client never retries (`max_retries=0`): the turn retries its own
    calls, and a rerun of the turn would run every reference again."""
    out = sys.stdout if out is None else out
    if presets is None:
        presets = demo_presets(base_url=base_url, models=models, aggregator=aggregator, config=config)
    name = preset or next(iter(presets), "")
    if name not in presets:
        raise DemoError(f"no preset {name!r}; the presets are: {', '.join(presets) or 'none'}", status=2)
    if base_url is None:
        upstream = sim_client(default_simulator(), max_retries=0)
        where = "the embedded simulator"
    else:
        key = demo_api_key(base_url, api_key=api_key, api_key_env=api_key_env)
        upstream = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
        where = shown_url(base_url)

    progress = Progress(out, layered=len(presets[name].layers) > 1)
    client = wrap(upstream, sinks=[progress.sink], trace_dir=trace_dir, presets=presets)
    through = " through the Responses API" if api == "responses" else ""
    print(f"moa_stream demo: preset moa:{name} against {where}{through}\n\n> {QUESTION}\n", file=out, flush=True)
    try:
        with session(session_id) as sid:
            async with client:
                failed = await _turn(client, f"moa:{name}", api, out, progress)
            # leaving `async with client` drained every event and trace line
    finally:
        progress.close()
    progress.flush()  # what came after the printer stopped: the references of a failed turn
    if failed is not None:
        raise DemoError(describe_failure(failed), status=1)
    calls = [e for e in progress.events if isinstance(e, CallUsage)]
    print(format_calls(calls), file=out)
    turns = sum(isinstance(e, TurnTrace) for e in progress.events)
    print(f"\n{turns} turn traced in {trace_dir / f'{sid}.jsonl'}", file=out)
    return calls


async def _turn(
    client: openai.AsyncOpenAI, model: str, api: DemoApi, out: TextIO, progress: Progress
) -> openai.APIError | None:
    """The turn with its progress lines printed alongside; the API error that ended it, if any."""
    answer = _Answer(out, progress.ready)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(progress.show)
        try:
            await _stream_answer(client, model, api, answer)
        except openai.APIError as exc:
            if answer.started:
                print(file=out)  # ends the answer's line, cut short
            return exc
        finally:
            tasks.cancel_scope.cancel()
    print("\n", file=out)
    return None


class _Answer:
    """Writes the answer's text to `out`, its first piece once `ready` (the progress lines are out)."""

    def __init__(self, out: TextIO, ready: anyio.Event) -> None:
        self.started = False
        self._out = out
        self._ready = ready

    async def write(self, text: str) -> None:
        if not self.started:
            self.started = True
            # The progress lines come from a sink thread: without this wait, a fast aggregator's
            # first tokens overtake them.
            with anyio.move_on_after(_PROGRESS_GRACE_S):
                await self._ready.wait()
        print(text, end="", file=self._out, flush=True)


async def _stream_answer(client: openai.AsyncOpenAI, model: str, api: DemoApi, answer: _Answer) -> None:
    """Ask for the turn through `api` and write the answer's text as it streams."""
    if api == "responses":
        events = await client.responses.create(model=model, input=QUESTION, stream=True)
        async with events:
            async for event in events:
                if event.type == "response.output_text.delta":
                    await answer.write(event.delta)
        return
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    # The usage chunk is asked for as any caller who shows usage would.
    chunks = await client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    async with chunks:
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                await answer.write(chunk.choices[0].delta.content)


class Progress:
    """The turn's progress lines, printed by `show()` in the demo's own task: the sink, called on a
    sink thread, only hands events over. So the lines come in the order the engine emitted them, and
    `ready` is set once the "aggregating" line is out, which the answer waits for."""

    def __init__(self, out: TextIO, *, layered: bool) -> None:
        self.events: list[Event] = []
        """Every event of the turn, in the order delivered."""
        self.ready = anyio.Event()
        self._out = out
        self._layered = layered
        # The events to print, and a wake-up per event: a wait abandoned by a cancelled `show()`
        # can only swallow a wake-up, never an event.
        self._pending: collections.deque[Event] = collections.deque()
        self._wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()

    def sink(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, ReferenceStarted | ReferenceDone | Aggregating):
            self._pending.append(event)
            self._wakeups.put(None)

    async def show(self) -> None:
        """Print progress lines as they arrive, until the aggregating line (then `ready` is set)."""
        while True:
            while self._pending:
                event = self._pending.popleft()
                print(self.line(event), file=self._out, flush=True)
                if isinstance(event, Aggregating):
                    self.ready.set()
                    return
            await anyio.to_thread.run_sync(self._wakeups.get, abandon_on_cancel=True)

    def flush(self) -> None:
        """Print the lines that arrived after `show()` stopped."""
        while self._pending:
            print(self.line(self._pending.popleft()), file=self._out, flush=True)

    def close(self) -> None:
        """Release a wait that a cancelled `show()` left behind on a worker thread."""
        self._wakeups.put(None)

    def line(self, event: Event) -> str:
        """The progress line for `event`: the layer is named when the preset has several."""
        if isinstance(event, ReferenceStarted):
            model = "" if event.model == event.label else f" ({event.model})"
            return f"  {self._layer(event.layer)}reference {event.label}{model} started"
        if isinstance(event, ReferenceDone):
            done = f"({event.done}/{event.total} done)"
            return f"  {self._layer(event.layer)}reference {event.label}: {event.status} {done}"
        if isinstance(event, Aggregating):
            used = f"{event.references_used}/{event.references_total}"
            return f"  aggregating {used} answers with {event.model}\n"
        return f"  {type(event).__name__}"

    def _layer(self, layer: int) -> str:
        return f"layer {layer}: " if self._layered else ""


def describe_failure(exc: openai.APIError) -> str:
    """One line for a turn that failed: the URL asked, what came back, and what to check."""
    url = shown_url(str(exc.request.url))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = _message(exc.body)
        if exc.code in ("upstream_unreachable", "upstream_timeout") and message:
            return message  # the library's own: it names the upstream and what the connection did
        line = f"{url} answered {_status_line(status)}" + (f": {message}" if message else "")
        if status == 404 and "model" not in (message or "").lower():  # a wrong path, not an unknown model
            line += " (is --base-url right? OpenAI-compatible APIs usually end in /v1)"
        elif status in (401, 403):
            line += f" (check the API key: --api-key-env NAME, else ${KEY_ENV})"
        return line
    if isinstance(exc, openai.APIConnectionError):
        reason = str(exc.__cause__ or "") or exc.message  # httpx's own errors may say nothing
        return f"cannot reach {url}: {reason}"
    return f"the answer from {url} broke off: {_cut(exc.message)}"


def _status_line(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:  # a status Python has no name for
        return str(status)


def _message(body: object) -> str | None:
    """The error's message when the body is OpenAI-shaped (or plain text, not a page), else None."""
    if isinstance(body, dict):
        message = body.get("message")
        return _cut(message) if isinstance(message, str) and message else None
    if isinstance(body, str) and body.strip() and not body.lstrip().startswith("<"):
        return _cut(body)
    return None


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "\N{HORIZONTAL ELLIPSIS}"


async def run_local_demo(*, trace_dir: Path, api: DemoApi = "chat", out: TextIO | None = None) -> list[CallUsage]:
    """The demo on SmolLM2-135M served by llama.cpp on loopback (the `local` extra), started and stopped here."""
    out = sys.stdout if out is None else out
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
