"""Fast mode's params transform gives what the SDK's gives, and skips the SDK's only where that is provable.

The SDK's `async_maybe_transform` (and the sync `maybe_transform` that `responses.parse` uses) walks
the params' TypedDict annotations on every call. Fast mode's resources call `ParamsTransform`
instead: the same result, taken as a copy of plain JSON where no alias or format can apply, and the
SDK's own transform for anything else. Bare clients in the same process keep the SDK's transform.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal, NotRequired, Required, TypedDict

import openai
import openai._utils._transform as sdk_transform
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import NOT_GIVEN, omit
from openai._utils._transform import PropertyInfo, async_maybe_transform, maybe_transform
from openai.resources.chat import AsyncChat
from openai.resources.chat.completions import AsyncCompletions
from openai.resources.responses import AsyncResponses
from openai.types.chat import ChatCompletionMessage, completion_create_params
from openai.types.responses import response_create_params

import moa_stream
from moa_stream._fast import ParamsTransform
from moa_stream._sdk import default_http_module, make_params_transform, params_transform
from moa_stream.testing import SimTransport, Simulator

CHAT = completion_create_params.CompletionCreateParamsNonStreaming
CHAT_STREAMING = completion_create_params.CompletionCreateParamsStreaming
CHAT_UNION = completion_create_params.CompletionCreateParams
RESPONSES = response_create_params.ResponseCreateParamsNonStreaming
RESPONSES_UNION = response_create_params.ResponseCreateParams

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
            "required": ["word"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
MESSAGES = [
    {"role": "developer", "content": "Be terse."},
    {"role": "system", "content": [{"type": "text", "text": "You answer in English."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is on this picture?"},
            {"type": "image_url", "image_url": {"url": "https://x.invalid/a.png", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            {"type": "file", "file": {"file_id": "file-1"}},
        ],
        "name": "ann",
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}],
        "audio": {"id": "audio-1"},
    },
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "found"}]},
    {"role": "function", "name": "old", "content": "legacy"},
]
CHAT_PARAMS: dict[str, dict[str, Any]] = {
    "minimal": {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hi"}]},
    "every_message_kind": {"model": "gpt-4.1", "messages": MESSAGES},
    "not_given_everywhere_at_the_top": {
        "model": "gpt-4.1",
        "messages": MESSAGES[:1],
        "stream": NOT_GIVEN,
        "temperature": omit,
        "tools": omit,
        "user": NOT_GIVEN,
    },
    "sampling_and_limits": {
        "model": "o3",
        "messages": MESSAGES[:2],
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "temperature": 0.0,
        "top_p": 1,
        "seed": 7,
        "n": 2,
        "max_tokens": None,
        "max_completion_tokens": 100,
        "logprobs": True,
        "top_logprobs": 3,
        "logit_bias": {"50256": -100, "11": 5},
        "stop": ["\n\n", "END"],
        "reasoning_effort": "high",
        "verbosity": "low",
        "service_tier": "flex",
        "store": False,
        "parallel_tool_calls": False,
        "user": "u-1",
        "safety_identifier": "s-1",
        "prompt_cache_key": "k",
    },
    "tools_and_choice": {
        "model": "gpt-4.1",
        "messages": MESSAGES[:3],
        "tools": [TOOL, {"type": "custom", "custom": {"name": "raw", "format": {"type": "text"}}}],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "functions": [{"name": "legacy", "parameters": {"type": "object"}}],
        "function_call": "auto",
    },
    "response_format_json_schema": {
        "model": "gpt-4.1",
        "messages": MESSAGES[:1],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"}}}},
                "strict": True,
            },
        },
    },
    "metadata_modalities_audio_prediction": {
        "model": "gpt-4o-audio-preview",
        "messages": MESSAGES[:1],
        "metadata": {"team": "search", "run": "3"},
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "mp3"},
        "prediction": {"type": "content", "content": [{"type": "text", "text": "draft"}]},
        "web_search_options": {"search_context_size": "low", "user_location": {"type": "approximate"}},
    },
    "streaming": {
        "model": "gpt-4.1",
        "messages": MESSAGES[:1],
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    },
    "unknown_keys_and_vendor_fields": {
        "model": "local-llama",
        "messages": [{"role": "user", "content": "Hi", "x_vendor": {"nested": [1, 2.5, None, True]}}],
        "extra_top_level": [[1, [2, [3]]], {"deep": {"deeper": ["x"]}}],
    },
    "shapes_the_types_do_not_expect": {
        "model": "gpt-4.1",
        "messages": {"role": "user", "content": "a dict, not a list"},
        "tools": "not a list",
        "metadata": [1, 2],
        "stop": None,
    },
}
RESPONSES_PARAMS: dict[str, dict[str, Any]] = {
    "string_input": {"model": "gpt-4.1", "input": "Hi", "instructions": "Be terse."},
    "input_items": {
        "model": "gpt-4.1",
        "input": [
            {"role": "user", "content": "Hi"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Look"},
                    {"type": "input_image", "image_url": "https://x.invalid/a.png", "detail": "auto"},
                    {"type": "input_file", "file_id": "file-1"},
                ],
            },
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "found"},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thought"}]},
            {"type": "item_reference", "id": "msg_1"},
        ],
    },
    "tools_reasoning_text": {
        "model": "o4-mini",
        "input": "Hi",
        "tools": [
            {"type": "function", "name": "lookup", "parameters": TOOL["function"]["parameters"], "strict": True},  # type: ignore[index]
            {"type": "web_search"},
            {"type": "file_search", "vector_store_ids": ["vs_1"], "max_num_results": 3},
        ],
        "tool_choice": {"type": "function", "name": "lookup"},
        "reasoning": {"effort": "medium", "summary": "auto"},
        "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}, "strict": True}},
        "include": ["reasoning.encrypted_content"],
        "truncation": "auto",
    },
    "everything_else": {
        "model": "gpt-4.1",
        "input": "Hi",
        "stream": True,
        "stream_options": {"include_obfuscation": False},
        "metadata": {"a": "b"},
        "max_output_tokens": 64,
        "max_tool_calls": 2,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_logprobs": 2,
        "previous_response_id": "resp_1",
        "store": True,
        "background": False,
        "parallel_tool_calls": True,
        "service_tier": "auto",
        "prompt": {"id": "pmpt_1", "variables": {"city": "Paris"}},
        "conversation": "conv_1",
        "instructions": NOT_GIVEN,
        "user": omit,
    },
}
CASES = [(CHAT, params) for params in CHAT_PARAMS.values()] + [
    (RESPONSES, params) for params in RESPONSES_PARAMS.values()
]
CASE_IDS = [f"chat-{name}" for name in CHAT_PARAMS] + [f"responses-{name}" for name in RESPONSES_PARAMS]


def fast_only() -> ParamsTransform:
    """A `ParamsTransform` whose fallback fails the test: what it returns, it worked out itself."""

    def refuse(data: object, expected_type: object) -> Any:
        raise AssertionError(f"went to the SDK's transform: {data!r}")

    async def refuse_async(data: object, expected_type: object) -> Any:
        refuse(data, expected_type)

    return make_params_transform(refuse, refuse_async)


class Recorded:
    """A `ParamsTransform` over the SDK's real transforms that records what it hands them."""

    def __init__(self) -> None:
        self.handed: list[object] = []

        def sdk(data: object, expected_type: object) -> Any:
            self.handed.append(data)
            return maybe_transform(data, expected_type)

        async def sdk_async(data: object, expected_type: object) -> Any:
            self.handed.append(data)
            return await async_maybe_transform(data, expected_type)

        self.transform = make_params_transform(sdk, sdk_async)


# -- (a) the short cut equals the SDK's transform ---------------------------------------------------


@pytest.mark.parametrize(("expected_type", "params"), CASES, ids=CASE_IDS)
async def test_plain_params_transform_to_what_the_sdk_gives_without_it(
    expected_type: object, params: dict[str, Any]
) -> None:
    fast = fast_only()
    for params_type in (expected_type, CHAT_UNION if expected_type is CHAT else RESPONSES_UNION):
        expected = await async_maybe_transform(params, params_type)
        assert await fast.async_maybe_transform(params, params_type) == expected
        assert fast.maybe_transform(params, params_type) == maybe_transform(params, params_type)


async def test_not_given_values_are_dropped_at_the_top_and_the_rest_is_copied() -> None:
    params = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "n": NOT_GIVEN, "user": omit}
    result = await fast_only().async_maybe_transform(params, CHAT)
    assert result == {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    # A copy, as the SDK's own result is: later changes to the caller's objects do not reach it.
    params["messages"][0]["content"] = "changed"
    assert result["messages"][0]["content"] == "Hi"


async def test_none_stays_none() -> None:
    assert await fast_only().async_maybe_transform(None, CHAT) is None
    assert fast_only().maybe_transform(None, CHAT) is None


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12,
)
chat_fields = st.sampled_from([*sorted(CHAT.__annotations__), "unknown"])
responses_fields = st.sampled_from([*sorted(RESPONSES.__annotations__), "unknown"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["chat", "responses"]),
    st.data(),
)
async def test_any_plain_json_under_any_field_transforms_like_the_sdk(kind: str, data: st.DataObject) -> None:
    fields = chat_fields if kind == "chat" else responses_fields
    params_type = CHAT_UNION if kind == "chat" else RESPONSES_UNION
    values = st.one_of(json_values, st.just(NOT_GIVEN), st.just(omit))
    params = data.draw(st.dictionaries(fields, values, max_size=6))
    assert await fast_only().async_maybe_transform(params, params_type) == await async_maybe_transform(
        params, params_type
    )


# -- (b) what only the SDK can transform goes to it ------------------------------------------------


def gen_messages() -> Iterator[dict[str, str]]:
    yield {"role": "user", "content": "from a generator"}


class Cycle(TypedDict, total=False):
    name: str
    children: list[Cycle]


class Renamed(TypedDict, total=False):
    card_id: Required[Annotated[str, PropertyInfo(alias="cardID")]]


class Dated(TypedDict, total=False):
    when: Annotated[str | datetime.date, PropertyInfo(format="iso8601")]


class NestedRename(TypedDict, total=False):
    items: list[str | Renamed]


class Tagged(TypedDict, total=False):
    kind: Literal["a", "b"]
    choice: Annotated[Cycle | Renamed, PropertyInfo(discriminator="kind")]


class Unresolved(TypedDict, total=False):
    later: NotRequired[NotDefinedAnywhere]  # type: ignore[name-defined]  # noqa: F821


class Role(str):
    """A str subclass, as a str enum member would be: not plain JSON to the short cut."""


REFUSED: dict[str, Callable[[], dict[str, Any]]] = {
    "pydantic_message": lambda: {
        "model": "m",
        "messages": [ChatCompletionMessage(role="assistant", content="earlier"), {"role": "user", "content": "Hi"}],
    },
    "generator_messages": lambda: {"model": "m", "messages": gen_messages()},
    "tuple_messages": lambda: {"model": "m", "messages": ({"role": "user", "content": "Hi"},)},
    "tuple_stop": lambda: {"model": "m", "messages": [], "stop": ("a", "b")},
    "date_in_metadata": lambda: {"model": "m", "messages": [], "metadata": {"day": datetime.date(2024, 1, 2)}},
    "bytes_content": lambda: {"model": "m", "messages": [{"role": "user", "content": b"raw"}]},
    "not_given_deeper_down": lambda: {"model": "m", "messages": [{"role": "user", "content": "Hi", "name": NOT_GIVEN}]},
    "omit_in_a_tool": lambda: {"model": "m", "messages": [], "tools": [{**TOOL, "type": omit}]},
    "non_str_key": lambda: {"model": "m", "messages": [], "logit_bias": {50256: -100}},
    "str_subclass": lambda: {"model": "m", "messages": [{"role": Role("user"), "content": "Hi"}]},
}


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_data_that_is_not_plain_json_goes_to_the_sdks_transform(name: str) -> None:
    recorded = Recorded()
    result = await recorded.transform.async_maybe_transform(REFUSED[name](), CHAT)
    assert len(recorded.handed) == 1
    assert result == await async_maybe_transform(REFUSED[name](), CHAT)
    sync_result = recorded.transform.maybe_transform(REFUSED[name](), CHAT)
    assert len(recorded.handed) == 2
    assert sync_result == maybe_transform(REFUSED[name](), CHAT)


async def test_a_pydantic_message_is_dumped_as_the_sdk_dumps_it() -> None:
    result = await Recorded().transform.async_maybe_transform(REFUSED["pydantic_message"](), CHAT)
    assert result["messages"][0] == {"role": "assistant", "content": "earlier"}


@pytest.mark.parametrize(
    ("params_type", "data"),
    [
        (Renamed, {"card_id": "c"}),
        (Dated, {"when": "2024-01-02"}),
        (NestedRename, {"items": ["x"]}),
        (Unresolved, {"later": 1}),
        (dict[str, object], {"a": 1}),
        (list[CHAT], {"a": 1}),  # type: ignore[valid-type]
    ],
    ids=["alias", "format", "alias_reached_through_a_list", "unresolvable_annotation", "not_a_typeddict", "a_list"],
)
async def test_types_that_may_rename_or_reformat_go_to_the_sdks_transform(params_type: Any, data: Any) -> None:
    recorded = Recorded()
    if params_type is Unresolved:
        with pytest.raises(NameError):  # the SDK's own error
            await recorded.transform.async_maybe_transform(data, params_type)
    else:
        result = await recorded.transform.async_maybe_transform(data, params_type)
        assert result == await async_maybe_transform(data, params_type)
    assert recorded.handed == [data]


def test_discriminators_and_recursive_types_are_plain() -> None:
    fast = fast_only()
    assert fast.skips(Tagged) is False  # it reaches `Renamed`
    assert fast.skips(Cycle)
    assert fast.maybe_transform({"name": "a", "children": [{"name": "b", "children": []}]}, Cycle) == {
        "name": "a",
        "children": [{"name": "b", "children": []}],
    }


NOVEL_INFO = PropertyInfo(discriminator="kind")
NOVEL_INFO.transform_hint = "upper"  # type: ignore[attr-defined]  # what a newer SDK might add


class Novel(TypedDict, total=False):
    x: Annotated[str, NOVEL_INFO]


class DiscriminatedOnly(TypedDict, total=False):
    x: Annotated[str, PropertyInfo(discriminator="kind")]


def test_a_property_info_with_a_field_we_do_not_know_is_refused() -> None:
    assert fast_only().skips(Novel) is False
    assert fast_only().skips(DiscriminatedOnly) is True


async def test_data_nested_deeper_than_the_limit_goes_to_the_sdk() -> None:
    deep: Any = "leaf"
    for _ in range(100):
        deep = [deep]
    recorded = Recorded()
    params = {"model": "m", "messages": [], "metadata": {"x": deep}}
    assert await recorded.transform.async_maybe_transform(params, CHAT) == await async_maybe_transform(params, CHAT)
    assert len(recorded.handed) == 1


# -- (c) fast clients send the bytes bare clients send --------------------------------------------


class Answer(pydantic.BaseModel):
    answer: str


Sent = dict[str, list[bytes]]


def recording_client(sim: Simulator, sent: Sent) -> openai.AsyncOpenAI:
    """A client of `sim` that records each request body as the SDK built it ("sdk", an httpx request
    hook, before any middleware) and as the upstream received it ("upstream")."""
    http = default_http_module()
    inner = SimTransport(sim, http_module=http)

    class Upstream(http.AsyncBaseTransport):  # type: ignore[misc,name-defined]
        async def handle_async_request(self, request: Any) -> Any:
            sent["upstream"].append(await request.aread())
            return await inner.handle_async_request(request)

    async def hook(request: Any) -> None:
        sent["sdk"].append(await request.aread())

    http_client = http.AsyncClient(transport=Upstream(), event_hooks={"request": [hook]})
    return openai.AsyncOpenAI(base_url="http://sim.local/v1", api_key="sim-key", http_client=http_client)


Call = Callable[[openai.AsyncOpenAI], Awaitable[None]]


async def chat_create(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="sim-small", messages=MESSAGES[:3], tools=[TOOL], temperature=0.3)


async def chat_create_streamed(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="sim-small", messages=MESSAGES[:1], stream=True, stream_options={"include_usage": True}
    )
    async for _ in stream:
        pass


async def chat_parse(client: openai.AsyncOpenAI) -> None:
    with contextlib.suppress(pydantic.ValidationError):  # the simulator's text is not the answer's JSON
        await client.chat.completions.parse(model="sim-small", messages=MESSAGES[:2], response_format=Answer)


async def chat_stream(client: openai.AsyncOpenAI) -> None:
    async with client.chat.completions.stream(model="sim-small", messages=MESSAGES[:2], metadata={"a": "b"}) as s:
        async for _ in s:
            pass


async def chat_raw(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.with_raw_response.create(model="sim-small", messages=MESSAGES[:1])


async def chat_pydantic_message(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="sim-small", messages=REFUSED["pydantic_message"]()["messages"])


async def responses_create(client: openai.AsyncOpenAI) -> None:
    await client.responses.create(model="sim-small", input=RESPONSES_PARAMS["input_items"]["input"][:2])


async def responses_create_streamed(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(model="sim-small", input="Hi", instructions="terse", stream=True)
    async for _ in stream:
        pass


async def responses_parse(client: openai.AsyncOpenAI) -> None:
    with contextlib.suppress(pydantic.ValidationError):
        await client.responses.parse(model="sim-small", input="Hi", text_format=Answer)


async def responses_stream(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="sim-small", input="Hi", max_output_tokens=32) as s:
        async for _ in s:
            pass


CALLS: dict[str, Call] = {
    "chat.create": chat_create,
    "chat.create(stream=True)": chat_create_streamed,
    "chat.parse": chat_parse,
    "chat.stream": chat_stream,
    "chat.with_raw_response.create": chat_raw,
    "chat.create(pydantic message)": chat_pydantic_message,
    "responses.create": responses_create,
    "responses.create(stream=True)": responses_create_streamed,
    "responses.parse": responses_parse,
    "responses.stream": responses_stream,
}


@pytest.mark.parametrize("name", list(CALLS))
async def test_a_fast_client_sends_the_bytes_a_bare_client_sends(name: str) -> None:
    sim = Simulator()
    bare_sent: Sent = {"sdk": [], "upstream": []}
    wrapped_sent: Sent = {"sdk": [], "upstream": []}
    fast_sent: Sent = {"sdk": [], "upstream": []}
    bare = recording_client(sim, bare_sent)
    wrapped = moa_stream.wrap(recording_client(sim, wrapped_sent))
    fast = moa_stream.wrap(recording_client(sim, fast_sent), fast=True)
    for client in (bare, wrapped, fast):
        await CALLS[name](client)
    # As the SDK built it, and as the upstream got it through the middleware (which may add to a stream).
    assert fast_sent["sdk"] == bare_sent["sdk"]
    assert len(fast_sent["sdk"]) == 1
    assert fast_sent["upstream"] == wrapped_sent["upstream"]
    await wrapped.close()
    await fast.close()


# -- (d) only fast clients use it ------------------------------------------------------------------


@pytest.fixture
def sdk_walks(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The data the SDK's transform walks, from its recursive step (looked up as a module global)."""
    walked: list[object] = []
    real_async = sdk_transform._async_transform_recursive
    real_sync = sdk_transform._transform_recursive

    async def walk_async(data: object, **kwargs: Any) -> object:
        walked.append(data)
        return await real_async(data, **kwargs)

    def walk_sync(data: object, **kwargs: Any) -> object:
        walked.append(data)
        return real_sync(data, **kwargs)

    monkeypatch.setattr(sdk_transform, "_async_transform_recursive", walk_async)
    monkeypatch.setattr(sdk_transform, "_transform_recursive", walk_sync)
    return walked


@pytest.mark.parametrize("name", ["chat.create", "chat.parse", "chat.stream", "responses.create", "responses.parse"])
async def test_a_bare_client_beside_a_fast_one_keeps_the_sdks_transform(name: str, sdk_walks: list[object]) -> None:
    sim = Simulator()
    sent: Sent = {"sdk": [], "upstream": []}
    bare = recording_client(sim, sent)
    fast = moa_stream.wrap(recording_client(sim, sent), fast=True)
    await CALLS[name](fast)
    assert sdk_walks == []
    await CALLS[name](bare)
    assert sdk_walks != []
    await fast.close()


async def test_copies_and_wrappers_of_a_fast_client_keep_the_fast_resources(sdk_walks: list[object]) -> None:
    sent: Sent = {"sdk": [], "upstream": []}
    fast = moa_stream.wrap(recording_client(Simulator(), sent), fast=True)
    for client in (fast, fast.with_options(timeout=30), fast.copy(max_retries=1)):
        assert type(client.chat) is not AsyncChat
        assert type(client.chat.completions) is not AsyncCompletions
        assert type(client.responses) is not AsyncResponses
        await client.chat.completions.with_raw_response.create(model="sim-small", messages=MESSAGES[:1])
        async with client.with_streaming_response.responses.create(model="sim-small", input="Hi") as response:
            await response.read()
    assert sdk_walks == []
    assert len(sent["sdk"]) == 6
    await fast.close()


async def test_fast_mode_patches_nothing_in_the_sdks_modules() -> None:
    import openai.resources.chat.completions.completions as completions_module
    import openai.resources.responses.responses as responses_module

    before = {m: (m.async_maybe_transform, m.maybe_transform) for m in (completions_module, responses_module)}
    fast = moa_stream.wrap(recording_client(Simulator(), {"sdk": [], "upstream": []}), fast=True)
    assert type(fast.chat.completions) is not AsyncCompletions
    assert {m: (m.async_maybe_transform, m.maybe_transform) for m in before} == before
    assert completions_module.AsyncCompletions.create.__wrapped__.__globals__["async_maybe_transform"] is (
        async_maybe_transform
    )
    assert params_transform().sdk_async is async_maybe_transform
    await fast.close()


def test_a_resource_whose_methods_never_transform_is_left_as_the_sdks() -> None:
    from openai._resource import AsyncAPIResource

    from moa_stream._sdk import _transform_swaps, fast_resource_class

    class Models(AsyncAPIResource):
        async def ping(self) -> str:
            return "pong"

    assert fast_resource_class(Models, _transform_swaps(params_transform())) is None


def test_resources_cached_before_fast_mode_is_switched_on_are_replaced() -> None:
    from moa_stream._sdk import specialize

    client = openai.AsyncOpenAI(api_key="k", base_url="http://x.invalid/v1")
    assert type(client.chat) is AsyncChat
    specialize(client, fast=True, budget=False)
    assert type(client.chat) is not AsyncChat
    assert type(client.with_raw_response.chat.completions._completions) is not AsyncCompletions
