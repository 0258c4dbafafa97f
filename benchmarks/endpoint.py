"""The endpoint bench: the bare SDK, the wrapped client and fast mode against an OpenAI-compatible
endpoint, side by side; with a preset, the preset against its aggregator alone.

`moa-stream bench --base-url URL --model M [--config moa.toml --preset P]`. Variants, each on its own
client and connection pool, all asking for the same streamed chat completion (`--prompt`,
`--max-tokens`, `stream_options={"include_usage": True}` for every one, so that all do the same work):
- `bare`: `openai.AsyncOpenAI`;
- `wrapped`: the same wrapped by `moa_stream.wrap` with a no-op sink (no trace_dir);
- `fast`: the same with `wrap(..., fast=True)`;
- with `--config`: `moa:P`, the preset through a wrapped client (its usage chunk reports the
  aggregator's call alone, `usage="aggregator"`, so that its tokens compare with the next), and
  `aggregator`, the preset's aggregator model alone (its slot's overrides and upstream, if any).

Per concurrency level (`c` requests in flight, each worker sending the next request as its last one
ends, as LLMPerf's `--num-concurrent-requests` and vLLM's `--max-concurrency` do), each variant first
sends `c` unmeasured requests (connections open, a variant that cannot be served stops the run),
then `--requests` in up to 5 blocks, the variants taking turns block by block in an order that
rotates every round, so that drift of a shared endpoint hits them alike.

The definitions are those of vLLM's `benchmark_serving.py` (`vllm bench serve`), with the names other
tools give the same figure:
- TTFT, time to first token: from just before the request is sent to the first chunk that carries
  text (content or reasoning_content; like GenAI-Perf and LLMPerf, the empty role chunk does not count).
- ITL, inter-token latency: every gap between consecutive chunks that carry text, pooled over the
  level's requests (vLLM's ITL; its percentiles show stalls that a per-request mean hides).
- TPOT, time per output token: per request, (E2EL - TTFT) / (output tokens - 1), for requests of
  two tokens or more (vLLM's TPOT; GenAI-Perf calls this inter-token latency and LLMPerf
  `inter_token_latency_s`, both per request).
- E2EL, end-to-end latency: from just before the request is sent to the end of the stream, its
  usage chunk included (LLMPerf's `end_to_end_latency_s`, GenAI-Perf's request latency).
- Output tokens: `completion_tokens` of the stream's usage chunk; without one (llama.cpp sends none),
  the chunks that carried text. Per-request output tokens/s is output tokens / E2EL (LLMPerf's
  `request_output_throughput_token_per_s`); the aggregate is the variant's output tokens at a level
  over its wall time there (vLLM's output token throughput), and so is requests/s.
- CPU per chunk and per call: `time.process_time()` of this process (every thread, the sink
  thread and the flush of the events included) over the variant's blocks, divided by the chunks the
  caller read and by the requests.
Percentiles are nearest-rank (a value that was measured, not an interpolation): p50 and p99 in the
table, p50, p90, p95 and p99 with mean, min and max in the JSON; with fewer than 100 values, p99 is
the largest or next to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

import msgspec
import openai

import moa_stream
from moa_stream import Preset, Slot
from moa_stream._redact import scrub
from moa_stream._redact import url_without_credentials as shown_url
from moa_stream._sdk import default_http_module
from moa_stream._server._command import is_loopback as is_loopback_host

from ._common import SectionResult, has_fast_mode, null_sink, print_section, pyplot, save_figure, write_json
from ._endpoint_measure import Block, Progress, Variant, run_block, run_level, summarize
from ._endpoint_report import HEADERS, notes, plot, preset_comparison, rows

NAME = "endpoint"
TITLE = "Endpoint: bare SDK, wrapped and fast mode side by side"
DEFAULT_PROMPT = "Explain in one paragraph why streaming APIs need careful resource cleanup."
NO_KEY = "unused"
"""The API key sent to a loopback endpoint when the key variable is not set."""
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


class EndpointError(Exception):
    """The endpoint bench cannot run: a bad option, or an endpoint that cannot be reached, refuses
    the key or does not serve the model. The message is one line, meant for the terminal."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    """What to measure and how much (the options of `moa-stream bench --base-url`)."""

    base_url: str
    model: str
    api_key_env: str | None = None
    """The variable holding the key; None: `OPENAI_API_KEY`, which a loopback endpoint may go without."""
    concurrency: tuple[int, ...] = (1, 4)
    requests: int = 20
    """Measured requests per variant and level."""
    max_tokens: int = 128
    prompt: str = DEFAULT_PROMPT
    config: Path | None = None
    """A moa.toml; with it, `preset` (default: its first) is measured against its aggregator alone."""
    preset: str | None = None

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        try:
            parts.port  # noqa: B018 (parsing the port is what raises)
        except ValueError:
            parts = parts._replace(scheme="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointError(
                f"--base-url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {shown_url(self.base_url)!r}"
            )
        if not self.model:
            raise EndpointError("--model must name a model")
        if self.api_key_env is not None and not self.api_key_env:
            raise EndpointError("--api-key-env must name an environment variable")
        if not self.concurrency or any(level < 1 for level in self.concurrency):
            raise EndpointError(f"concurrency levels must be >= 1, got {list(self.concurrency)}")
        for field in ("requests", "max_tokens"):
            if getattr(self, field) < 1:
                raise EndpointError(f"{field} must be >= 1, got {getattr(self, field)!r}")
        if self.preset is not None and self.config is None:
            raise EndpointError("a preset needs the moa.toml it is defined in (--config)")


def is_loopback(base_url: str) -> bool:
    """Whether `base_url` is on this machine (local servers often take no key)."""
    return is_loopback_host(urllib.parse.urlsplit(base_url).hostname or "")


def key_env(config: EndpointConfig) -> str:
    return config.api_key_env or DEFAULT_KEY_ENV


def api_key(config: EndpointConfig) -> str:
    """The key from `$api_key_env`. Without `--api-key-env`, a loopback endpoint may go without one
    (`NO_KEY`); a variable named explicitly must be set, since the user said the endpoint needs it."""
    name = key_env(config)
    key = os.environ.get(name)
    if key:
        return key
    if config.api_key_env is None and is_loopback(config.base_url):
        return NO_KEY
    raise EndpointError(
        f"${name} is not set: export the API key for {shown_url(config.base_url)} there"
        + ("" if config.api_key_env else ", or name the variable that holds it with --api-key-env")
    )


def describe_failure(exc: Exception, *, base_url: str, model: str, key_env: str) -> str:
    """One line on why a request failed, in the user's terms."""
    if isinstance(exc, openai.APITimeoutError):
        return f"{base_url} did not answer in time"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach {base_url}: {exc.__cause__ or exc}"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        detail = body.get("message") if isinstance(body, dict) else None
        said = f"HTTP {exc.status_code}: {detail or exc.message}"
        if isinstance(exc, openai.NotFoundError):
            return (
                f"{base_url} does not serve model {model!r} ({said}); check --model, and that the base URL "
                "is the one /chat/completions is under (often ending in /v1)"
            )
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return f"{base_url} refused the API key from ${key_env} ({said})"
        return f"{base_url} answered model {model!r} with {said}"
    return f"{type(exc).__name__}: {exc}"


# -- the variants -----------------------------------------------------------------------------------


def _client(base_url: str, key: str, connections: int) -> openai.AsyncOpenAI:
    """A plain client without retries (a failure is counted, not hidden), its pool sized to the
    highest level so that the SDK's pool never queues a request the level means to have in flight."""
    http = default_http_module()
    limits = http.Limits(max_connections=connections, max_keepalive_connections=connections)
    http_client = openai.DefaultAsyncHttpxClient(limits=limits)
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, http_client=http_client)


def _wrapped(client: openai.AsyncOpenAI, *, fast: bool = False, **options: Any) -> openai.AsyncOpenAI:
    wrap: Any = moa_stream.wrap  # `fast` is not in every version's signature
    if fast:
        options["fast"] = True
    wrapped: openai.AsyncOpenAI = wrap(client, sinks=[null_sink], **options)
    return wrapped


def load_preset(config: EndpointConfig) -> tuple[str, Preset] | None:
    """(name, preset) from `config.config`, or None without one."""
    if config.config is None:
        return None
    try:
        presets = moa_stream.load_config(config.config)
    except moa_stream.ConfigError as exc:
        raise EndpointError(str(exc)) from None
    name = config.preset or next(iter(presets), "")
    if name not in presets:
        raise EndpointError(f"{config.config}: no preset {name!r}; the presets are: {', '.join(presets) or 'none'}")
    return name, presets[name]


def build_variants(config: EndpointConfig, key: str, preset: tuple[str, Preset] | None = None) -> list[Variant]:
    """The clients compared, in the order of the first round; with `preset` (name, preset), the
    preset and its aggregator alone too."""
    pool = max(config.concurrency)
    messages = [{"role": "user", "content": config.prompt}]
    request = {"messages": messages, "max_tokens": config.max_tokens}

    def client() -> openai.AsyncOpenAI:
        return _client(config.base_url, key, pool)

    variants = [
        Variant("bare", client(), config.model, request, wrapped=False),
        Variant("wrapped", _wrapped(client()), config.model, request, wrapped=True),
    ]
    if has_fast_mode():
        variants.append(Variant("fast", _wrapped(client(), fast=True), config.model, request, wrapped=True))
    if preset is not None:
        name, chosen = preset
        # The caller's usage chunk then counts the aggregator's tokens, those the caller reads.
        presets = {name: msgspec.structs.replace(chosen, usage="aggregator")}
        moa = _wrapped(client(), presets=presets)
        variants.append(Variant(f"moa:{name}", moa, f"moa:{name}", request, wrapped=True))
        slot = chosen.aggregator_slot()
        upstream = client() if slot.base_url is None else _client(slot.base_url, _slot_key(slot), pool)
        variants.append(Variant("aggregator", _wrapped(upstream), slot.model, _alone(slot, config), wrapped=True))
    return variants


def _slot_key(slot: Slot) -> str:
    """The key of an aggregator slot with its own upstream: as the wrapped client reads it for the preset."""
    if slot.api_key_env is None:
        return NO_KEY
    key = os.environ.get(slot.api_key_env)
    if not key:
        raise EndpointError(f"${slot.api_key_env} (api_key_env of the aggregator slot for {slot.base_url}) is not set")
    return key


def _alone(slot: Slot, config: EndpointConfig) -> dict[str, Any]:
    """The aggregator slot's request on its own: the prompt under the slot's system text and overrides."""
    system = [{"role": "system", "content": slot.system}] if slot.system else []
    request: dict[str, Any] = {
        "messages": [*system, {"role": "user", "content": config.prompt}],
        "max_tokens": slot.max_tokens or config.max_tokens,
    }
    if slot.temperature is not None:
        request["temperature"] = slot.temperature
    if slot.seed is not None:
        request["seed"] = slot.seed
    if slot.extra:
        request["extra_body"] = dict(slot.extra)
    return request


# -- the run ----------------------------------------------------------------------------------------


async def _warm_up(variant: Variant, in_flight: int, config: EndpointConfig, secrets: list[str]) -> Block:
    """`in_flight` unmeasured requests; if every one failed, the run stops with the first error."""
    block = await run_block(variant, in_flight, in_flight)
    first = block.records[0].exception
    if first is not None and all(record.error is not None for record in block.records):
        base_url = shown_url(str(variant.client.base_url).rstrip("/"))
        message = describe_failure(first, base_url=base_url, model=variant.model, key_env=key_env(config))
        # One line, whatever the server put in its message.
        raise EndpointError(scrub(" ".join(f"{variant.name}: {message}".split()), secrets))
    return block


def _secrets(key: str, preset: tuple[str, Preset] | None) -> list[str]:
    """The keys that error messages must not show: the endpoint's, and those of slots with their own upstream."""
    slots: list[Slot] = []
    if preset is not None:
        slots = [*(slot for layer in preset[1].reference_layers() for slot in layer), preset[1].aggregator_slot()]
    names = [slot.api_key_env for slot in slots if slot.api_key_env]
    found = [key, *(os.environ.get(name, "") for name in names)]
    return [secret for secret in found if secret and secret != NO_KEY]


async def measure_endpoint(config: EndpointConfig) -> SectionResult:
    """Run every level for every variant; the result has the table, the notes and the JSON figures."""
    key = api_key(config)
    preset = load_preset(config)
    secrets = _secrets(key, preset)
    preset_name = None if preset is None else preset[0]
    variants = build_variants(config, key, preset)
    levels: dict[str, dict[str, Any]] = {}
    progress = Progress(sum(level + config.requests for level in config.concurrency) * len(variants))
    try:
        for level in config.concurrency:
            warm_up_errors = {}
            for variant in variants:
                block = await _warm_up(variant, level, config, secrets)
                warm_up_errors[variant.name] = sum(record.error is not None for record in block.records)
                progress.advance(level, f"concurrency {level} (warm-up)")
            blocks = await run_level(variants, level, config.requests, progress)
            figures = {name: summarize(runs) for name, runs in blocks.items()}
            for name, row in figures.items():
                row["warm_up_errors"] = warm_up_errors[name]
                if row["first_error"]:
                    row["first_error"] = scrub(row["first_error"], secrets)
            levels[str(level)] = {"concurrency": level, "variants": figures}
    finally:
        progress.close()
        for variant in variants:
            await variant.client.close()
    return SectionResult(
        section=NAME,
        title=TITLE,
        headers=HEADERS,
        rows=[row for entry in levels.values() for row in rows(entry)],
        results={"levels": levels, "preset": preset_comparison(levels, preset_name)},
        notes=notes(levels, preset=preset_name, requests=config.requests, fast_mode=has_fast_mode()),
        config={
            "base_url": shown_url(config.base_url),
            "model": config.model,
            "api_key_env": key_env(config),
            "concurrency": list(config.concurrency),
            "requests": config.requests,
            "max_tokens": config.max_tokens,
            "prompt": config.prompt,
            "config": None if config.config is None else str(config.config),
            "preset": preset_name,
            "variants": [variant.name for variant in variants],
            "models": {variant.name: variant.model for variant in variants},
        },
    )


# -- output -----------------------------------------------------------------------------------------


def run(config: EndpointConfig, *, out_dir: Path, command: str | None = None) -> SectionResult:
    """Measure, print the table, write `<out_dir>/endpoint.json` and, with matplotlib, `endpoint.png`."""
    started = time.perf_counter()
    result = asyncio.run(measure_endpoint(config))
    result.elapsed_s = time.perf_counter() - started
    print_section(result)
    written = [write_json(result, out_dir, extra={"command": command})]
    plt = pyplot()
    if plt is not None:
        written.append(save_figure(plt, plot(result, plt, title=TITLE), out_dir / f"{NAME}.png"))
    print("written: " + ", ".join(str(path) for path in written), flush=True)
    if plt is None:
        print("\nnote: matplotlib is not installed, so no PNG plot (pip install 'moa-stream[bench]')")
    return result
