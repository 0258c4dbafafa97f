"""LiteLLM: the `acompletion` and `aresponses` arguments that route a call through a wrapped client."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import openai
from openai.types.responses import Response, ResponseStreamEvent

if TYPE_CHECKING:
    import httpx

__all__ = ["acompletion_kwargs", "aresponses_kwargs"]

# Headers of LiteLLM's request that the wrapped client sets itself (its own key included).
_OWN_HEADERS = frozenset({"host", "content-length", "authorization", "api-key", "accept-encoding", "connection"})
# Headers of the upstream's answer that no longer describe the body LiteLLM reads (it is decoded).
_STALE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection"})


def acompletion_kwargs(client: openai.AsyncOpenAI, model: str, *, stream: bool = False) -> dict[str, Any]:
    """Keyword arguments for `litellm.acompletion(messages=..., **acompletion_kwargs(client, model))`
    that send the call for `model` (a model name or `moa:<preset>`) through `client`, a client
    returned by `moa_stream.wrap()`.

    They name LiteLLM's OpenAI provider (`openai/<model>`), pass `client` with its base URL and key
    (so LiteLLM's logs name the real upstream), and with `stream=True` ask for usage: LiteLLM only
    does that by itself for api.openai.com, and without it a stream reports no usage.
    """
    kwargs: dict[str, Any] = {
        "model": f"openai/{model}",
        "client": client,
        "api_base": str(client.base_url),
        "api_key": client.api_key,
    }
    if stream:
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
    return kwargs


def aresponses_kwargs(client: openai.AsyncOpenAI, model: str) -> dict[str, Any]:
    """Keyword arguments for `litellm.aresponses(input=..., **aresponses_kwargs(client, model))` that
    send the call for `model` (a model name or `moa:<preset>`) through `client`, a client returned by
    `moa_stream.wrap()`.

    LiteLLM's Responses path does not call an `AsyncOpenAI`: it posts with an HTTP handler of its own
    and ignores a `client=` of any other type, so the call would go out unmetered. The handler given
    here sends each of its requests through `client` (its transport, retries and timeout); LiteLLM's
    `timeout=` still bounds each read. Close it with `await kwargs["client"].close()`; that leaves
    `client` open.
    """
    handler: Any = _handler_class()(client)
    return {"model": f"openai/{model}", "client": handler, "api_base": str(client.base_url), "api_key": client.api_key}


@functools.cache
def _handler_class() -> type[Any]:
    """LiteLLM's `AsyncHTTPHandler` whose HTTP clients (its retry's after a dropped connection too)
    send through a wrapped client; built on first use, so importing this module needs no LiteLLM."""
    import httpx
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

    class _Body(httpx.AsyncByteStream):
        def __init__(self, stream: openai.AsyncStream[Any]) -> None:
            self._stream = stream

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for part in self._stream.response.aiter_bytes():
                yield part

        async def aclose(self) -> None:
            await self._stream.close()

    class _ThroughClient(httpx.AsyncBaseTransport):
        def __init__(self, client: openai.AsyncOpenAI) -> None:
            self._client = client

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            headers = {name: value for name, value in request.headers.items() if name.lower() not in _OWN_HEADERS}
            read = (request.extensions.get("timeout") or {}).get("read")
            client = self._client if read is None else self._client.with_options(timeout=read)
            try:
                # stream=True for the SDK: hand back the response unread, whatever the body asks for.
                stream = await client.post(
                    str(request.url),
                    cast_to=Response,
                    content=await request.aread(),
                    options={"headers": headers},
                    stream=True,
                    stream_cls=openai.AsyncStream[ResponseStreamEvent],
                )
            except openai.APIStatusError as exc:  # LiteLLM maps the status and body itself
                return _response(exc.response, request, content=exc.response.content)
            except openai.APITimeoutError as exc:
                raise httpx.ReadTimeout(str(exc), request=request) from exc
            except openai.APIConnectionError as exc:
                raise httpx.ConnectError(str(exc), request=request) from exc
            return _response(stream.response, request, stream=_Body(stream))

    def _response(upstream: Any, request: httpx.Request, **body: Any) -> httpx.Response:
        kept = [(name, value) for name, value in upstream.headers.items() if name.lower() not in _STALE_HEADERS]
        return httpx.Response(upstream.status_code, headers=kept, request=request, **body)

    class MeteredHandler(AsyncHTTPHandler):
        def __init__(self, client: openai.AsyncOpenAI) -> None:
            self._transport = _ThroughClient(client)
            super().__init__(timeout=client.timeout if isinstance(client.timeout, float | int) else None)

        def create_client(
            self, timeout: Any, event_hooks: Any, ssl_verify: Any = None, shared_session: Any = None
        ) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=self._transport, timeout=timeout, event_hooks=event_hooks)

    return MeteredHandler
