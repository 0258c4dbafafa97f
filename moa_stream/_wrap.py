"""`wrap()`: a real AsyncOpenAI whose HTTP transport meters every chat call."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import openai

from ._config import ConfigError, Preset, load_config, validate_presets
from ._dispatch import DEFAULT_SINK_BUFFER, Sink
from ._fast import fast_client_class
from ._httpcompat import module_of
from ._meter import Engine
from ._moa import DEFAULT_UPSTREAM_CONCURRENCY, Presets
from ._pricing import PriceInput, PriceTable
from ._redact import RedactInput, make_redactor
from ._transport import MeteringTransport, metering_transport_class

ClientT = TypeVar("ClientT", bound=openai.AsyncOpenAI)


def wrap(
    client: ClientT,
    *,
    sinks: Iterable[Sink] = (),
    trace_dir: str | os.PathLike[str] | None = None,
    prices: Mapping[str, PriceInput] | None = None,
    price_file: str | os.PathLike[str] | None = None,
    sink_buffer: int = DEFAULT_SINK_BUFFER,
    drain_timeout: float = 10.0,
    presets: Mapping[str, Preset] | None = None,
    config: str | os.PathLike[str] | None = None,
    upstream_concurrency: int = DEFAULT_UPSTREAM_CONCURRENCY,
    fast: bool = False,
    redact: RedactInput | None = None,
) -> ClientT:
    """Return a copy of `client` (same class, same options) whose chat calls are metered.

    Every chat completion made through it, or through its `with_options()` copies, ends in one
    `CallUsage` per upstream call and one `TurnEnd` and `TurnTrace` per turn, delivered to `sinks`
    and, with `trace_dir`, appended to `<trace_dir>/<session_id>.jsonl`. `prices` (model name to a
    `ModelPrice` or a LiteLLM-style dict) and `price_file` (a LiteLLM price JSON) extend the built-in
    price table. `await client.close()` drains pending events before it returns. The original client
    is left as it was, but shares its connection pool with the copy.

    `presets` (name to `Preset`) and `config` (a `moa.toml` with `[presets.<name>]` tables) define the
    Mixture-of-Agents presets served as `model="moa:<name>"`; both are validated here, and a bad one
    raises `ConfigError`. `upstream_concurrency` bounds the reference calls in flight per upstream.

    `redact` (regular expressions, or a callable taking and returning text) is applied to the message
    texts, outputs and tool arguments of trace records, in files and for sinks alike; never to what
    goes upstream or to the caller.

    `fast=True` returns an instance of a subclass of the client's class that builds chat responses
    by validation instead of the SDK's slower construction (same objects, equal `model_dump()`,
    with the SDK's own path as the fallback for anything validation refuses).
    """
    if not isinstance(client, openai.AsyncOpenAI):
        raise TypeError(
            f"moa_stream.wrap() needs an openai.AsyncOpenAI (or AsyncAzureOpenAI) instance, "
            f"got {type(client).__module__}.{type(client).__qualname__}"
        )
    if find_engine(client) is not None:
        raise ValueError("this client is already wrapped by moa_stream; wrap the original client once")
    all_presets = load_config(config) if config is not None else {}
    for name, preset in validate_presets(presets or {}).items():
        if name in all_presets:
            raise ConfigError(f"presets=: preset {name!r} is also defined in {os.fspath(config or '')}")
        all_presets[name] = preset
    moa = Presets(all_presets, upstream_concurrency=upstream_concurrency)
    table = PriceTable.builtin()
    if price_file is not None:
        table = table.merged(PriceTable.from_litellm_file(price_file))
    if prices:
        table = table.updated(prices)
    engine = Engine(
        prices=table,
        sinks=sinks,
        trace_dir=trace_dir,
        sink_buffer=sink_buffer,
        drain_timeout=drain_timeout,
        redactor=None if redact is None else make_redactor(redact),
    )

    http_client: Any = copy.copy(client._client)
    transport_class = metering_transport_class(module_of(http_client))
    # Keep the original client alive: its HTTP client closes the shared pool when collected.
    engine.origin = client
    http_client._transport = transport_class(http_client._transport, engine, moa)
    http_client._mounts = {
        pattern: None if mounted is None else transport_class(mounted, engine, moa)
        for pattern, mounted in http_client._mounts.items()
    }
    wrapped = client.copy(http_client=http_client)
    if fast:
        # Same attributes, new methods: `with_options()` copies build `self.__class__`, so they stay fast.
        original: type[openai.AsyncOpenAI] = type(client)
        fast_class: Any = fast_client_class(original)
        wrapped.__class__ = fast_class
    return wrapped


def find_engine(client: openai.AsyncOpenAI) -> Engine | None:
    transport = getattr(getattr(client, "_client", None), "_transport", None)
    return transport.engine if isinstance(transport, MeteringTransport) else None


def engine_of(client: openai.AsyncOpenAI) -> Engine:
    """The engine behind a wrapped client: add sinks, read sink stats, flush events."""
    engine = find_engine(client)
    if engine is None:
        raise ValueError(f"{type(client).__qualname__} instance is not wrapped by moa_stream.wrap()")
    return engine


async def flush(client: openai.AsyncOpenAI) -> bool:
    """Wait until every event of `client` so far reached its sinks and trace files (without closing).

    Returns False if a sink did not keep up within the client's `drain_timeout`.
    """
    return await engine_of(client).flush()
