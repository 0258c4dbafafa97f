"""The one seam with the openai SDK and its HTTP library: every private detail they expose is used here.

- openai 2.x speaks `httpx`, openai 3.x `httpx2` (same API, other module); a client only accepts
  transports, responses and byte streams of its own module, so our classes are made per module.
- A wrapped client is a copy of the caller's whose HTTP client (a copy too, sharing the connection
  pool) sends every request through our transport; that transport carries a marker attribute by
  which the engine is found and an already wrapped client is unwrapped.
- Fast mode and budgets need a few SDK methods of their own: one subclass of the caller's client
  class per need, which `copy()`/`with_options()` keep because they build `self.__class__`.

`tests/test_sdk_contract.py` pins each of these details, so that an SDK upgrade fails there first.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import openai

from ._budget import BUDGET_ERROR, BUDGET_HEADER, BudgetExceeded
from ._fast import FastSSEDecoder, validate_response

T = TypeVar("T")
ClientT = TypeVar("ClientT", bound=openai.AsyncOpenAI)

ENGINE_MARKER = "moa_stream_engine"
"""The attribute of a metering transport that holds its engine (and says that it is one)."""


def default_http_module() -> ModuleType:
    """The HTTP module that the installed openai SDK builds its clients with."""
    import openai._base_client as base

    for name in ("httpx2", "httpx"):
        module = getattr(base, name, None)
        if isinstance(module, ModuleType):
            return module
    raise RuntimeError("cannot tell which HTTP library the installed openai SDK uses")


def http_module_of(http_client: object) -> ModuleType:
    """The `httpx`-like module that `http_client` (an AsyncClient instance) comes from."""
    for cls in type(http_client).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in ("httpx", "httpx2"):
            return importlib.import_module(root)
    raise TypeError(f"expected an httpx or httpx2 AsyncClient, got {type(http_client).__qualname__}")


def client_http_module(client: openai.AsyncOpenAI) -> ModuleType:
    """The HTTP module of the HTTP client that `client` sends its requests with."""
    return http_module_of(client._client)


@functools.cache
def for_module(cls: type[T], module: ModuleType, base: str) -> type[T]:
    """`cls`, made a subclass of `module.<base>` too (e.g. `AsyncBaseTransport`, `AsyncByteStream`),
    with the module at hand as `cls._http`. One class per (class, module), made once."""
    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_http": module}
    derived: type[T] = type(cls.__name__, (cls, getattr(module, base)), namespace)
    return derived


def install(client: ClientT, make_transport: Callable[[Any], Any]) -> ClientT:
    """A copy of `client` (same class, same options) whose requests all go through
    `make_transport(original transport)`, mounted transports included. The copy's HTTP client is a
    shallow copy of the original's, so both share one connection pool."""
    http_client: Any = copy.copy(client._client)
    http_client._transport = make_transport(http_client._transport)
    http_client._mounts = {
        pattern: None if mounted is None else make_transport(mounted)
        for pattern, mounted in http_client._mounts.items()
    }
    return client.copy(http_client=http_client)


def find_engine(client: object) -> Any | None:
    """The engine of a client made by `install` with a metering transport, else None."""
    transport = getattr(getattr(client, "_client", None), "_transport", None)
    return getattr(transport, ENGINE_MARKER, None)


def route_of(client: openai.AsyncOpenAI, path: str) -> tuple[ModuleType, Any, Any]:
    """Where `client` sends a POST to `path` (relative to its base URL): its HTTP module, the
    transport (below any metering transport, so a wrapped client is not metered twice) and the
    request it would build, with its default headers and credentials."""
    http_client: Any = client._client
    url = http_client.build_request("POST", f"{str(client.base_url).rstrip('/')}/{path.lstrip('/')}").url
    headers = {k: v for k, v in {**client.default_headers, **client.auth_headers}.items() if isinstance(v, str)}
    transport = http_client._transport_for_url(url)
    if getattr(transport, ENGINE_MARKER, None) is not None:
        transport = transport.inner
    return http_module_of(http_client), transport, http_client.build_request("POST", url, headers=headers)


# -- the client subclass for fast mode and budgets ------------------------------------------------


def specialize(client: openai.AsyncOpenAI, *, fast: bool, budget: bool) -> None:
    """Give `client` the subclass of its class with fast mode's and/or the budget's methods.

    A single base and no slots of its own keep the layout of the class, so the instance's class can
    be switched; nothing changes without `fast` or `budget` (the class stays the caller's own)."""
    if fast or budget:
        client.__class__ = _client_class(type(client), fast=fast, budget=budget)


_client_classes: dict[tuple[type[openai.AsyncOpenAI], bool, bool], type[openai.AsyncOpenAI]] = {}


def _client_class(cls: type[openai.AsyncOpenAI], *, fast: bool, budget: bool) -> type[openai.AsyncOpenAI]:
    known = _client_classes.get((cls, fast, budget))
    if known is not None:
        return known
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__slots__": ()}
    if fast:
        construct = cls._process_response_data

        def _process_response_data(self: Any, *, data: object, cast_to: Any, response: Any) -> Any:
            validated = validate_response(data, cast_to)
            return construct(self, data=data, cast_to=cast_to, response=response) if validated is None else validated

        namespace["_make_sse_decoder"] = lambda self: FastSSEDecoder()
        namespace["_process_response_data"] = _process_response_data
    if budget:
        make_status_error = cls._make_status_error

        def _make_status_error(self: Any, err_msg: str, *, body: object, response: Any) -> Any:
            # A refusal by our own budget guard is raised as `BudgetExceeded` (a BadRequestError).
            if response.headers.get(BUDGET_HEADER) == BUDGET_ERROR:
                return BudgetExceeded(err_msg, response=response, body=body)
            return make_status_error(self, err_msg, body=body, response=response)

        namespace["_make_status_error"] = _make_status_error
    derived: type[openai.AsyncOpenAI] = type(cls.__name__, (cls,), namespace)
    _client_classes[(cls, fast, budget)] = derived
    return derived
