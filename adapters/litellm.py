"""LiteLLM: the `acompletion` arguments that route a call through a wrapped client."""

from __future__ import annotations

from typing import Any

import openai

__all__ = ["acompletion_kwargs"]


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
