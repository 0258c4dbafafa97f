"""Integrations with agent frameworks, one module each, importing its framework only when called.

- `moa_stream.adapters.langchain.chat_openai(client, model)`: a metered, async-only `ChatOpenAI`.
- `moa_stream.adapters.litellm.acompletion_kwargs(client, model)` and `aresponses_kwargs(client, model)`:
  arguments for `litellm.acompletion` and `litellm.aresponses`.

The OpenAI Agents SDK and pydantic-ai need no glue: hand them the wrapped client itself.
"""
