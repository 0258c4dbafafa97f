"""LangChain: a `ChatOpenAI` whose calls go through a wrapped client, and only through it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import openai

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI

__all__ = ["chat_openai"]


class _AsyncOnly:
    """Stands in for LangChain's sync client, which moa_stream cannot meter (it wraps `AsyncOpenAI`
    only): a sync call fails at once instead of reaching the upstream unmetered."""

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("_"):  # copy, pickle and pydantic probe dunders: answer as a plain object
            raise AttributeError(name)
        raise RuntimeError(
            "this ChatOpenAI was built by moa_stream.adapters.langchain.chat_openai() and is async-only: "
            "use ainvoke/astream/abatch (moa_stream meters AsyncOpenAI, not the sync client)"
        )


def chat_openai(client: openai.AsyncOpenAI, model: str, **kwargs: Any) -> ChatOpenAI:
    """A `langchain_openai.ChatOpenAI` for `model` (a model name or `moa:<preset>`) that sends its
    calls through `client`, a client returned by `moa_stream.wrap()`.

    Streams ask for usage (`stream_usage=True`), so `astream` reports a MoA turn's whole usage as
    `ainvoke` does. It is async-only: `invoke`/`stream` raise `RuntimeError` rather than bypass the
    metering. Other `kwargs` go to `ChatOpenAI` (`temperature`, `max_tokens`, `stream_usage`...).
    """
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    kwargs.setdefault("stream_usage", True)
    return ChatOpenAI(
        model=model,
        async_client=client.chat.completions,
        root_async_client=client,
        client=_AsyncOnly(),
        root_client=_AsyncOnly(),
        base_url=str(client.base_url),
        api_key=SecretStr(client.api_key),
        **kwargs,
    )
