"""The one seam with the openai SDK and its HTTP library: every private detail they expose is used here.

- openai 2.x speaks `httpx`, openai 3.x `httpx2` (same API, other module); a client only accepts
  transports, responses and byte streams of its own module, so our classes are made per module.
- A wrapped client is a copy of the caller's whose HTTP client (a copy too, sharing the connection
  pool) sends every request through our transport; that transport carries a marker attribute by
  which the engine is found and an already wrapped client is unwrapped.
- Fast mode and budgets need a few SDK methods of their own: one subclass of the caller's client
  class per need, which `copy()`/`with_options()` keep because they build `self.__class__`.
- Fast mode's `chat` and `responses` are subclasses of the SDK's resources whose methods are copies
  of the SDK's own, with the module global `async_maybe_transform` they call bound to fast mode's
  `ParamsTransform` (so other clients in the process keep the SDK's transform). Where the SDK is not
  shaped as expected, the fast client keeps the SDK's resources.

`tests/test_sdk_contract.py` pins each of these details, so that an SDK upgrade fails there first.
"""

from __future__ import annotations

import copy
import functools
import importlib
import types
from collections.abc import Awaitable, Callable
from types import FunctionType, ModuleType
from typing import Any, TypeVar

import openai

from ._budget import BUDGET_ERROR, BUDGET_HEADER, BudgetExceeded
from ._fast import FastSSEDecoder, ParamsTransform, validate_response

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
    if fast:
        for name in _FAST_RESOURCES:
            vars(client).pop(name, None)  # resources cached before the switch would be the SDK's


def add_budget_errors(client: openai.AsyncOpenAI) -> None:
    """Make `client` raise `BudgetExceeded` for refusals (a budget was given after `wrap()`)."""
    for (cls, fast, budget), derived in list(_client_classes.items()):
        if type(client) is derived:
            if not budget:
                client.__class__ = _client_class(cls, fast=fast, budget=True)
            return
    specialize(client, fast=False, budget=True)


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
        namespace.update(_fast_resource_properties())
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


# -- fast mode's resources: the SDK's methods with fast mode's params transform -------------------

TRANSFORM_GLOBALS = ("maybe_transform", "async_maybe_transform")
"""The module globals by which the SDK's resource methods transform their params (most async methods
call `async_maybe_transform`; some, such as `responses.parse`, the sync `maybe_transform`)."""
_FAST_RESOURCES = ("chat", "responses", "with_raw_response", "with_streaming_response")
"""The client's cached properties that lead to fast mode's resources (the wrappers reach them)."""
_PROPERTY_INFO_FIELDS = frozenset({"alias", "format", "format_template", "discriminator"})


def _inert_metadata(metadata: object) -> bool:
    """Whether the SDK's transform leaves data under this `Annotated` metadata alone: anything but a
    `PropertyInfo`, or one with neither alias nor format (a discriminator only serves responses), and
    nothing we do not know of (a newer SDK's field might transform)."""
    from openai._utils._transform import PropertyInfo

    if not isinstance(metadata, PropertyInfo):
        return True
    fields = vars(metadata)
    return fields.keys() <= _PROPERTY_INFO_FIELDS and fields.get("alias") is None and fields.get("format") is None


@functools.cache
def params_transform() -> ParamsTransform:
    """Fast mode's stand-in for the SDK's params transforms (one per process: it caches verdicts)."""
    from openai._utils._transform import async_maybe_transform, maybe_transform

    return make_params_transform(maybe_transform, async_maybe_transform)


def make_params_transform(
    sdk: Callable[[object, object], Any], sdk_async: Callable[[object, object], Awaitable[Any]]
) -> ParamsTransform:
    """A `ParamsTransform` that judges types by the SDK's rules and hands what it refuses to `sdk`
    (sync) or `sdk_async`: the SDK's transforms, or in tests a recording of them."""
    from openai._compat import is_typeddict
    from openai._types import NotGiven, Omit

    return ParamsTransform(sdk, sdk_async, inert=_inert_metadata, is_typeddict=is_typeddict, not_given=(NotGiven, Omit))


def _transform_swaps(transform: ParamsTransform) -> dict[str, tuple[object, object]]:
    """Global name -> (the SDK's function that a method must call by it, fast mode's replacement)."""
    return {
        "maybe_transform": (transform.sdk, transform.maybe_transform),
        "async_maybe_transform": (transform.sdk_async, transform.async_maybe_transform),
    }


def _code_names(code: types.CodeType) -> set[str]:
    """The global and attribute names `code` and the code nested in it (comprehensions, closures) use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def rebind(fn: FunctionType, swaps: dict[str, tuple[object, object]]) -> FunctionType | None:
    """A copy of `fn` in which each SDK function of `swaps` that `fn` calls by its global name (itself,
    through a function in its closure such as a decorator's wrapped function, or through an openai
    module function it calls) is replaced by ours; None if `fn` reaches none of them."""
    return _rebind(fn, swaps, {})


def _rebind(
    fn: FunctionType, swaps: dict[str, tuple[object, object]], memo: dict[int, FunctionType | None]
) -> FunctionType | None:
    if id(fn) in memo:
        return memo[id(fn)]
    memo[id(fn)] = None  # a function that reaches itself again keeps the original there
    module_globals = fn.__globals__
    replaced: dict[str, object] = {}
    for name in _code_names(fn.__code__):
        value = module_globals.get(name)
        swap = swaps.get(name)
        if swap is not None and value is swap[0]:
            replaced[name] = swap[1]
        elif isinstance(value, FunctionType) and value.__module__.startswith("openai."):
            helper = _rebind(value, swaps, memo)
            if helper is not None:
                replaced[name] = helper
    closure = fn.__closure__
    if closure is not None:
        cells = list(closure)
        for index, cell in enumerate(cells):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(content, FunctionType):
                inner = _rebind(content, swaps, memo)
                if inner is not None:
                    cells[index] = types.CellType(inner)
        closure = tuple(cells)
    if not replaced and closure == fn.__closure__:
        return None
    rebound = FunctionType(fn.__code__, {**module_globals, **replaced}, fn.__name__, fn.__defaults__, closure)
    rebound.__kwdefaults__ = None if fn.__kwdefaults__ is None else dict(fn.__kwdefaults__)
    rebound.__dict__.update(fn.__dict__)
    wrapped = fn.__dict__.get("__wrapped__")
    if isinstance(wrapped, FunctionType):
        rebound.__wrapped__ = memo.get(id(wrapped)) or wrapped  # type: ignore[attr-defined]
    rebound.__qualname__ = fn.__qualname__
    rebound.__module__ = fn.__module__
    rebound.__doc__ = fn.__doc__
    rebound.__annotations__ = fn.__annotations__
    memo[id(fn)] = rebound
    return rebound


def fast_resource_class(cls: type[T], swaps: dict[str, tuple[object, object]]) -> type[T] | None:
    """A subclass of the SDK resource class `cls` whose methods that reach a function of `swaps` are
    copies calling ours instead; None if none does."""
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    memo: dict[int, FunctionType | None] = {}
    for name, attr in vars(cls).items():
        if isinstance(attr, FunctionType):
            rebound = _rebind(attr, swaps, memo)
            if rebound is not None:
                namespace[name] = rebound
    if len(namespace) == 2:
        return None
    derived: type[T] = type(cls.__name__, (cls,), namespace)
    return derived


@functools.cache
def _fast_resource_properties() -> dict[str, Any]:
    """The fast client class's `chat` and `responses` (cached properties, as the SDK's are), made once;
    those whose SDK classes are not shaped as expected are left out, so the SDK's own serve."""
    swaps = _transform_swaps(params_transform())
    properties: dict[str, Any] = {}
    try:
        from openai.resources.chat import AsyncChat
        from openai.resources.chat.completions import AsyncCompletions
        from openai.resources.responses import AsyncResponses

        completions = fast_resource_class(AsyncCompletions, swaps)
        responses = fast_resource_class(AsyncResponses, swaps)
    except Exception:  # a newer SDK moved them: fast mode keeps the SDK's resources
        return properties
    if completions is not None and isinstance(vars(AsyncChat).get("completions"), functools.cached_property):
        fast_completions = completions

        def _completions(self: Any) -> Any:
            return fast_completions(self._client)

        chat = type(
            AsyncChat.__name__,
            (AsyncChat,),
            {
                "__module__": AsyncChat.__module__,
                "__qualname__": AsyncChat.__qualname__,
                "completions": functools.cached_property(_completions),
            },
        )

        def _chat(self: Any) -> Any:
            return chat(self)

        properties["chat"] = functools.cached_property(_chat)
    if responses is not None:
        fast_responses = responses

        def _responses(self: Any) -> Any:
            return fast_responses(self)

        properties["responses"] = functools.cached_property(_responses)
    return properties
