"""`wrap()`: a real AsyncOpenAI whose HTTP transport meters every chat call."""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import openai

from ._budget import BUDGET_ERROR, BUDGET_HEADER, Budget, BudgetExceeded, load_budget, validate_budget
from ._config import ConfigError, Preset, check_key_variables, load_config, validate_presets
from ._dispatch import DEFAULT_SINK_BUFFER, Sink
from ._fast import fast_client_class
from ._httpcompat import module_of
from ._ledger import SessionLedger, SessionState, session_id_or_current
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
    budget: Budget | None = None,
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
    check_key_variables(all_presets, source=os.fspath(config or ""))
    given = validate_presets(presets or {})
    check_key_variables(given, source="presets=")
    for name, preset in given.items():
        if name in all_presets:
            raise ConfigError(f"presets=: preset {name!r} is also defined in {os.fspath(config or '')}")
        all_presets[name] = preset
    file_budget = load_budget(config) if config is not None else None
    if budget is not None and file_budget is not None:
        raise ConfigError(f"budget=: a budget is also defined in {os.fspath(config or '')}; give one of them")
    if budget is not None:
        budget = validate_budget(budget)
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
        budget=budget or file_budget,
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
    if engine.guard is not None:  # only a budget refuses calls
        _raise_budget_errors(wrapped)
    return wrapped


def _raise_budget_errors(client: openai.AsyncOpenAI) -> None:
    """Make `client` (and its `copy()`/`with_options()` copies) raise `BudgetExceeded` for a refused
    call, on the instance, so that its class stays the caller's own."""
    setattr(client, "_make_status_error", types.MethodType(_make_status_error, client))  # noqa: B010
    setattr(client, "copy", types.MethodType(_copy, client))  # noqa: B010
    setattr(client, "with_options", types.MethodType(_copy, client))  # noqa: B010


def _make_status_error(self: openai.AsyncOpenAI, err_msg: str, *, body: object, response: Any) -> Any:
    if response.headers.get(BUDGET_HEADER) == BUDGET_ERROR:
        return BudgetExceeded(err_msg, response=response, body=body)
    return type(self)._make_status_error(self, err_msg, body=body, response=response)


def _copy(self: openai.AsyncOpenAI, *args: Any, **kwargs: Any) -> Any:
    copied = type(self).copy(self, *args, **kwargs)
    _raise_budget_errors(copied)
    return copied


def find_engine(client: openai.AsyncOpenAI) -> Engine | None:
    transport = getattr(getattr(client, "_client", None), "_transport", None)
    return transport.engine if isinstance(transport, MeteringTransport) else None


def engine_of(client: openai.AsyncOpenAI) -> Engine:
    """The engine behind a wrapped client: add sinks, read sink stats, flush events."""
    engine = find_engine(client)
    if engine is None:
        raise ValueError(f"{type(client).__qualname__} instance is not wrapped by moa_stream.wrap()")
    return engine


def session_ledger(client: openai.AsyncOpenAI, session_id: str | None = None) -> SessionLedger:
    """What a session (default: the current one) has used through `client`, restarts included."""
    return engine_of(client).sessions.ledger(session_id_or_current(session_id))


def session_state(client: openai.AsyncOpenAI, session_id: str | None = None) -> SessionState:
    """The key-value state of a session (default: the current one), kept in its sidecar file."""
    return SessionState(engine_of(client).sessions, session_id_or_current(session_id))


async def flush(client: openai.AsyncOpenAI) -> bool:
    """Wait until every event of `client` so far reached its sinks and trace files (without closing).

    Returns False if a sink did not keep up within the client's `drain_timeout`.
    """
    return await engine_of(client).flush()
