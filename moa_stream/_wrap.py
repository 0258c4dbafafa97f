"""`wrap()`: a real AsyncOpenAI whose HTTP transport meters every chat call, and what a wrapped
client offers besides: its sessions' ledgers and state, its sinks, flushing."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgspec
import openai

from ._budget import Budget, validate_budget
from ._config import Config, read_config
from ._dispatch import DEFAULT_SINK_BUFFER, Sink, SinkStats
from ._engine import Engine
from ._errors import ConfigError
from ._ledger import session_id_or_current
from ._presets import Preset, check_key_variables, validate_presets
from ._pricing import PriceInput, PriceTable
from ._redact import RedactInput, make_redactor
from ._redis_store import open_store
from ._sdk import add_budget_errors, client_http_module, find_engine, for_module, install, specialize
from ._sidecar import SessionLedger
from ._slots import DEFAULT_UPSTREAM_CONCURRENCY
from ._store import SessionState, StoreConfig, validate_store
from ._transport import MeteringTransport

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
    budget: Budget | None = None,
    store: str | StoreConfig | None = None,
    propagate_trace: bool = False,
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

    `budget` (or the `[budget]` table of `config`) sets hard limits per session and per turn, checked
    before each upstream call starts (a refused call raises `moa_stream.BudgetExceeded` and sends
    nothing), and soft limits that emit a `BudgetWarning` once. Each session's running totals are
    kept by `moa_stream.session_ledger(client)`; with `trace_dir` they persist in
    `<trace_dir>/<session_id>.state.json` beside the trace file, with `session_state(client)`.

    `store` (a Redis URL, or a `StoreConfig`; or the `[store]` table of `config`, whose url a URL
    given here replaces) keeps sessions'
    ledgers, state, budget holds, per-session budgets and MoA reference caches in Redis, shared by
    every process that uses the same store (needs the `redis` extra); without it they live in this
    process (and in sidecar files with `trace_dir`).

    `propagate_trace=True` sends the caller's current OpenTelemetry span upstream as W3C
    `traceparent`/`tracestate` headers, so that a provider or gateway that traces joins the trace.

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
    file = read_config(config) if config is not None else None
    all_presets = dict(file.presets) if file is not None else {}
    check_key_variables(all_presets, source=file.source if file is not None else "")
    given = validate_presets(presets or {})
    check_key_variables(given, source="presets=")
    for name, preset in given.items():
        if name in all_presets:
            raise ConfigError(f"presets=: preset {name!r} is also defined in {os.fspath(config or '')}")
        all_presets[name] = preset
    if budget is not None and file is not None and file.budget is not None:
        raise ConfigError(f"budget=: a budget is also defined in {os.fspath(config or '')}; give one of them")
    if budget is not None:
        budget = validate_budget(budget)
    elif file is not None:
        budget = file.budget
    store_config = _store_config(store, file)
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
        budget=budget,
        presets=all_presets,
        upstream_concurrency=upstream_concurrency,
        store=None if store_config is None else open_store(store_config),
        store_unavailable=None if store_config is None else store_config.unavailable,
        propagate_trace=propagate_trace,
    )
    # Keep the original client alive: its HTTP client closes the shared pool when collected.
    engine.origin = client
    transport_class = for_module(MeteringTransport, client_http_module(client), "AsyncBaseTransport")
    main = True

    def metering(inner: Any) -> MeteringTransport:
        nonlocal main  # the first one made wraps the client's main transport, which owns the engine
        owns, main = main, False
        transport: MeteringTransport = transport_class(inner, engine, owns_engine=owns)
        return transport

    wrapped = install(client, metering)
    specialize(wrapped, fast=fast, budget=budget is not None or store_config is not None)
    return wrapped


def _store_config(store: str | StoreConfig | None, file: Config | None) -> StoreConfig | None:
    """The store: `store=`, or the `[store]` table of the config file, or the table with the URL
    given as `store=` (as `serve --store` does), which keeps the table's other fields."""
    table = file.store if file is not None else None
    if table is None:
        return validate_store(store) if store is not None else None
    assert file is not None
    if isinstance(store, StoreConfig):
        raise ConfigError(f"store=: a store is also defined in {file.source}; give one of them")
    if store is not None:
        table = validate_store(msgspec.structs.replace(table, url=store))
    if not table.url:
        raise ConfigError(f"{file.source}: [store] has no url; give one there, or as store= (serve --store)")
    return table


def _engine_of(client: openai.AsyncOpenAI) -> Engine:
    engine = find_engine(client)
    if not isinstance(engine, Engine):
        raise ValueError(f"{type(client).__qualname__} instance is not wrapped by moa_stream.wrap()")
    return engine


def session_ledger(client: openai.AsyncOpenAI, session_id: str | None = None) -> SessionLedger:
    """What a session (default: the current one) has used through `client`, restarts included."""
    return _engine_of(client).store.ledger(session_id_or_current(session_id))


def session_state(client: openai.AsyncOpenAI, session_id: str | None = None) -> SessionState:
    """The key-value state of a session (default: the current one), kept in its sidecar file (or
    the store)."""
    return SessionState(_engine_of(client).store, session_id_or_current(session_id))


def set_session_budget(client: openai.AsyncOpenAI, session_id: str, budget: Budget | None) -> None:
    """Give one session its own budget, which replaces the client's for that session; None removes
    it. Kept in the store, so with a shared store every process enforces it (per-user limits)."""
    if budget is not None:
        budget = validate_budget(budget, source="set_session_budget()")
        add_budget_errors(client)
    _engine_of(client).store.set_session_budget(session_id_or_current(session_id), budget)


def add_sink(client: openai.AsyncOpenAI, sink: Sink, *, name: str | None = None, buffer: int | None = None) -> None:
    """Deliver every later event of `client` to `sink` too (sync sinks run in a worker thread).

    `buffer` is how many events may wait for this sink before new ones are dropped for it.
    """
    _engine_of(client).add_sink(sink, name=name, buffer=buffer)


def sink_stats(client: openai.AsyncOpenAI) -> list[SinkStats]:
    """Delivered, failed and dropped counts per sink of `client` (the trace writer included)."""
    return _engine_of(client).sink_stats()


async def flush(client: openai.AsyncOpenAI) -> bool:
    """Wait until every event of `client` so far reached its sinks and trace files (without closing).

    Returns False if a sink did not keep up within the client's `drain_timeout`.
    """
    return await _engine_of(client).flush()
