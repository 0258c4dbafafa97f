"""Plain text of the commands: the help formatter, the simulator's help, and the formatting shared by
the `traces` commands."""

from __future__ import annotations

import argparse
import datetime
import math
import textwrap
from pathlib import Path
from typing import TextIO

import msgspec

from .._events import TurnTrace, event_decoder
from .._traces import read_traces
from ..testing import FaultKind, SimModel, Simulator

PROG = "moa-stream traces"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (they hold lists and examples), and each option's default
    at the end of its help, unless the help names it already or there is none to name."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return f"{text} (default: %(default)s)"


# -- the simulator ------------------------------------------------------------------------------

FAULT_HELP: dict[FaultKind, str] = {
    "http_429": "a 429 before any byte, asking for a retry after 1 ms",
    "http_500": "a 500 before any byte",
    "disconnect": "the connection dropped after N events",
    "stall": "silence for S seconds after N events",
    "malformed": "one event that is not JSON after N events, then the rest",
    "stream_error": "an in-stream error event after N events, and no [DONE] (Responses: an `error` event, "
    "no terminal event)",
    "invalid_utf8": "after N events, the next one sent with an event holding half a multibyte character, "
    "in one read; then the end",
    "reject_stream_options": "a 400 for a chat request that carries stream_options",
    "no_usage": "no usage ever (as llama.cpp's server; Responses say usage: null)",
    "usage_unasked": "a usage chunk whether asked for or not (as vLLM with --enable-force-include-usage)",
    "echo_key": "a 401 whose message echoes the request's credentials (as some gateways do)",
}
"""What each fault does, as `Fault` implements it; `moa-stream sim --help` lists them."""


def describe_model(model: SimModel) -> str:
    """What a simulated model does, in a few words: its latency, its reply, its fault."""
    first = f"first token after {model.ttft_s:g} s"
    if model.jitter:
        first += f" (times a lognormal of sigma {model.jitter:g}, seeded by the request)"
    speed = f"{model.tokens_per_s:g} tokens/s" if model.tokens_per_s else "no delay between tokens"
    parts = [first, speed, f"{plural(model.reply_tokens, 'word')} unless the request's token limit is lower"]
    if model.reasoning_tokens:
        parts.append(
            f"{plural(model.reasoning_tokens, 'word')} of reasoning first (reasoning_content; Responses: a summary)"
        )
    if model.fault is not None:
        parts.append(f"fault {model.fault.kind} on every request")
    return ", ".join(parts)


def rows(pairs: list[tuple[str, str]], *, width: int = 100) -> str:
    """Two columns, the second wrapped under itself."""
    left = max((len(name) for name, _ in pairs), default=0) + 4
    return "\n".join(
        textwrap.fill(
            text, width, initial_indent=f"  {name}".ljust(left), subsequent_indent=" " * left, break_on_hyphens=False
        )
        for name, text in pairs
    )


def sim_description(simulator: Simulator) -> str:
    """`moa-stream sim --help`: what it serves, its models, and the fault header."""
    models = [(model.name, describe_model(model)) for model in simulator.models]
    models.append(("(other)", "any other model name: " + describe_model(SimModel(name="other"))))
    return f"""\
Serve the embedded simulator over HTTP on http://HOST:PORT/v1: an OpenAI-compatible upstream for
trying the middleware, tests and benchmarks, without keys or costs (any API key is accepted).
Routes: POST /v1/chat/completions, POST /v1/responses (GET /v1/responses/ID retrieves one, with
?stream=true resumes a background one; POST /v1/responses/ID/cancel) and GET /v1/models; anything
else is a 404 in OpenAI's error shape. Replies are made-up words, the same for the same model,
messages, seed and temperature; usage counts words as tokens.

models:
{rows(models)}

faults: a request header injects one into that request (chat and Responses create alike):

  x-sim-fault: KIND[;after=N][;stall=S]

N is how many SSE events come first (default 0), S the length of a stall in seconds (default
3600); `x-sim-fault: none` switches off a model's own fault; an unknown kind or option is a 400.
A non-streamed reply is delayed by a stall, dropped by a disconnect, and garbled by malformed and
invalid_utf8. KIND is one of:
{rows(list(FAULT_HELP.items()))}

example:
  curl -N http://127.0.0.1:8000/v1/chat/completions -H 'x-sim-fault: disconnect;after=3' \\
    -H 'content-type: application/json' \\
    -d '{{"model": "sim-small", "stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}'
  from the openai SDK: extra_headers={{"x-sim-fault": "http_429"}}"""


class BadInput(Exception):
    """A message for stderr; the command exits 1."""


# -- formatting ---------------------------------------------------------------------------------


def usd(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "unknown"
    return f"${value:.6f}"


def secs(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.3f}s"


def tokens(value: int | None, mark: str) -> str:
    return "?" if value is None else f"{mark}{value:,}"


def when(timestamp: float) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def load(path: Path, err: TextIO) -> list[TurnTrace]:
    """Every record of `path`; a torn last line is mentioned on `err`, anything worse raises."""
    try:
        records = list(read_traces(path))
        data = path.read_bytes()
    except ValueError as exc:  # read_traces names the file and line
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    # read_traces skips a last line that does not decode (a crash mid-write); say so.
    tail = data.rsplit(b"\n", 1)[-1]
    if tail.strip():
        try:
            event_decoder.decode(tail)
        except msgspec.DecodeError:
            line = data.count(b"\n") + 1
            print(
                f"{PROG}: {path}:{line}: incomplete last line skipped (a crash or a write in progress)",
                file=err,
            )
    return records


_CONTROL = {code: "\N{REPLACEMENT CHARACTER}" for code in (*range(0x20), *range(0x7F, 0xA0)) if code not in (9, 10)}


def printable(text: str) -> str:
    return text.translate(_CONTROL).expandtabs(4)


def cut(text: str, width: int) -> str:
    text = printable(text).replace("\n", " ")
    return text if len(text) <= width else text[: max(0, width - 1)] + "\N{HORIZONTAL ELLIPSIS}"
