"""The openai SDK's and its HTTP library's private details that `moa_stream._sdk` relies on, one by one.

When an SDK upgrade moves one of them, this file fails first and names it; `_sdk` is the one module
to change. They hold on openai 2.x (httpx) and 3.x (httpx2) alike.
"""

from __future__ import annotations

import inspect
from types import ModuleType

import openai
import pytest

from moa_stream._sdk import default_http_module, find_engine, for_module, http_module_of, install, route_of, specialize
from moa_stream.testing import Simulator, sim_client


def test_the_sdk_names_its_http_module() -> None:
    import openai._base_client as base

    http = default_http_module()
    assert isinstance(http, ModuleType)
    assert getattr(base, http.__name__) is http
    assert http.__name__ == ("httpx2" if openai.__version__.startswith("3.") else "httpx")


def test_a_client_holds_an_http_client_with_a_transport_and_mounts() -> None:
    client = openai.AsyncOpenAI(api_key="k", base_url="http://x.invalid/v1")
    http_client = client._client
    assert http_module_of(http_client) is default_http_module()
    assert isinstance(http_client._transport, default_http_module().AsyncBaseTransport)
    assert isinstance(http_client._mounts, dict)
    url = http_client.build_request("POST", "http://x.invalid/v1/chat/completions").url
    assert http_client._transport_for_url(url) is http_client._transport


def test_copy_keeps_the_http_client_it_is_given_and_its_class() -> None:
    client = openai.AsyncOpenAI(api_key="k", base_url="http://x.invalid/v1")
    seen = []
    copied = install(client, lambda inner: seen.append(inner) or inner)
    assert seen == [client._client._transport]
    assert copied._client is not client._client
    assert type(copied) is type(client)
    assert type(copied.with_options(timeout=3)) is type(client)


def test_the_methods_the_client_subclass_overrides_exist_with_their_signatures() -> None:
    cls = openai.AsyncOpenAI
    assert list(inspect.signature(cls._process_response_data).parameters) == ["self", "data", "cast_to", "response"]
    assert list(inspect.signature(cls._make_status_error).parameters) == ["self", "err_msg", "body", "response"]
    assert list(inspect.signature(cls._make_sse_decoder).parameters) == ["self"]
    # AsyncStream asks its client for the decoder, and reads only these of an event.
    assert "client._make_sse_decoder()" in inspect.getsource(openai.AsyncStream.__init__)
    assert "self._decoder.aiter_bytes(" in inspect.getsource(openai.AsyncStream._iter_events)


@pytest.mark.parametrize(("fast", "budget"), [(True, False), (False, True), (True, True)])
def test_the_client_class_can_be_switched_to_a_subclass(fast: bool, budget: bool) -> None:
    client = openai.AsyncOpenAI(api_key="k", base_url="http://x.invalid/v1")
    specialize(client, fast=fast, budget=budget)
    assert isinstance(client, openai.AsyncOpenAI)
    assert type(client) is not openai.AsyncOpenAI
    assert type(client.with_options(timeout=3)) is type(client)  # copies build `self.__class__`


def test_credentials_and_default_headers_are_readable() -> None:
    client = openai.AsyncOpenAI(api_key="sk-contract", base_url="http://x.invalid/v1", default_headers={"x-a": "b"})
    assert client.auth_headers == {"Authorization": "Bearer sk-contract"}
    assert client.default_headers["x-a"] == "b"
    http, transport, request = route_of(client, "chat/completions")
    assert http is default_http_module()
    assert str(request.url) == "http://x.invalid/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-contract"
    assert transport is client._client._transport


async def test_a_wrapped_client_is_found_and_unwrapped_by_its_marker() -> None:
    import moa_stream

    bare = sim_client(Simulator())
    wrapped = moa_stream.wrap(bare)
    engine = find_engine(wrapped)
    assert engine is not None
    assert find_engine(wrapped.with_options(max_retries=0)) is engine
    assert find_engine(bare) is None
    _, transport, _ = route_of(wrapped, "chat/completions")
    assert transport is bare._client._transport  # a slot with this client is not metered twice
    await wrapped.close()


def test_classes_are_made_once_per_http_module() -> None:
    class Probe:
        pass

    http = default_http_module()
    made = for_module(Probe, http, "AsyncByteStream")
    assert made is for_module(Probe, http, "AsyncByteStream")
    assert issubclass(made, Probe)
    assert issubclass(made, http.AsyncByteStream)
    assert made._http is http  # type: ignore[attr-defined]


async def test_fast_mode_sees_the_responses_types_it_validates() -> None:
    # Fast mode recognises a Responses stream by its `cast_to` being the very `ResponseStreamEvent`
    # union, whose members it tells apart by the discriminator the SDK's own metadata names.
    import typing

    from openai.types.responses import ResponseStreamEvent

    from moa_stream._fast import variants_by_tag

    client = sim_client(Simulator())
    stream = await client.responses.create(model="sim-small", input="Hi", stream=True)
    assert stream._cast_to is ResponseStreamEvent
    await stream.close()
    members = typing.get_args(typing.get_args(ResponseStreamEvent)[0])
    assert set(variants_by_tag(ResponseStreamEvent).values()) == set(members)


# -- fast mode's resources: the SDK methods `_sdk` copies and the transform they call ---------------


def test_resource_modules_call_the_sdks_params_transforms_by_their_global_names() -> None:
    import openai.resources.chat.completions.completions as completions_module
    import openai.resources.responses.responses as responses_module
    from openai._utils import _transform

    from moa_stream._sdk import TRANSFORM_GLOBALS

    assert TRANSFORM_GLOBALS == ("maybe_transform", "async_maybe_transform")
    for module in (completions_module, responses_module):
        assert module.async_maybe_transform is _transform.async_maybe_transform
        assert module.maybe_transform is _transform.maybe_transform
    assert list(inspect.signature(_transform.async_maybe_transform).parameters) == ["data", "expected_type"]
    assert list(inspect.signature(_transform.maybe_transform).parameters) == ["data", "expected_type"]


def test_the_methods_fast_mode_copies_reach_the_transform() -> None:
    from openai.resources.chat.completions import AsyncCompletions
    from openai.resources.responses import AsyncResponses

    from moa_stream._sdk import _transform_swaps, fast_resource_class, params_transform

    swaps = _transform_swaps(params_transform())
    completions = fast_resource_class(AsyncCompletions, swaps)
    responses = fast_resource_class(AsyncResponses, swaps)
    assert completions is not None
    assert responses is not None
    assert {"create", "parse"} <= set(vars(completions))
    assert {"create", "parse", "retrieve"} <= set(vars(responses))
    # `stream` calls the transform through `create` (and `retrieve`) of the resource it is given.
    for cls in (AsyncCompletions, AsyncResponses):
        assert "stream" not in vars(fast_resource_class(cls, swaps) or cls)
    # `create` is `required_args`' wrapper, with the SDK's function in its closure.
    wrapped = AsyncCompletions.create.__wrapped__  # type: ignore[attr-defined]
    assert any(cell.cell_contents is wrapped for cell in AsyncCompletions.create.__closure__ or ())
    assert "async_maybe_transform" in wrapped.__code__.co_names


def test_the_client_hands_out_its_resources_as_cached_properties() -> None:
    import functools

    from openai.resources.chat import AsyncChat
    from openai.resources.chat.completions import AsyncCompletions
    from openai.resources.responses import AsyncResponses

    client = openai.AsyncOpenAI(api_key="k", base_url="http://x.invalid/v1")
    for owner, name in ((openai.AsyncOpenAI, "chat"), (openai.AsyncOpenAI, "responses"), (AsyncChat, "completions")):
        assert isinstance(vars(owner)[name], functools.cached_property)
    assert type(client.chat) is AsyncChat
    assert type(client.chat.completions) is AsyncCompletions
    assert type(client.responses) is AsyncResponses
    # Built from the client alone, and the raw/streaming wrappers reach the resources through it.
    for cls in (AsyncChat, AsyncCompletions, AsyncResponses):
        assert list(inspect.signature(cls).parameters) == ["client"]
    assert "self._client.chat" in inspect.getsource(type(client.with_raw_response).chat.func)  # type: ignore[attr-defined]
    assert "self._client.responses" in inspect.getsource(type(client.with_streaming_response).responses.func)  # type: ignore[attr-defined]


def test_property_info_carries_alias_format_template_and_discriminator_only() -> None:
    # `_sdk` lets a PropertyInfo through only with fields it knows, neither alias nor format set.
    from openai._utils._transform import PropertyInfo

    assert set(vars(PropertyInfo())) == {"alias", "format", "format_template", "discriminator"}


async def test_the_sdks_transform_drops_top_level_not_given_values_of_a_typeddict() -> None:
    from openai._compat import is_typeddict
    from openai._types import NotGiven, Omit
    from openai._utils._transform import async_maybe_transform
    from openai.types.chat import completion_create_params

    params = completion_create_params.CompletionCreateParamsNonStreaming
    assert is_typeddict(params)
    assert isinstance(openai.NOT_GIVEN, NotGiven)
    assert isinstance(openai.omit, Omit)
    data = {"model": "m", "messages": [], "n": openai.NOT_GIVEN, "user": openai.omit}
    assert await async_maybe_transform(data, params) == {"model": "m", "messages": []}


def test_a_fast_client_gets_the_fast_resources() -> None:
    # Fast mode falls back to the SDK's resources without a word when the SDK changes; this says so.
    from openai.resources.chat import AsyncChat
    from openai.resources.chat.completions import AsyncCompletions
    from openai.resources.responses import AsyncResponses

    client = openai.AsyncOpenAI(api_key="k", base_url="http://x.invalid/v1")
    specialize(client, fast=True, budget=False)
    assert isinstance(client.chat, AsyncChat)
    assert type(client.chat) is not AsyncChat
    assert type(client.chat.completions) is not AsyncCompletions
    assert type(client.responses) is not AsyncResponses
