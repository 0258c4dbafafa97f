"""`moa-stream serve`: the presets and the upstream's models behind an OpenAI-compatible HTTP endpoint.

One wrapped client answers every request, so metering, traces and MoA turns are exactly the library's:
a request's body goes to `client.post("/chat/completions")` or `client.post("/responses")` as it arrived
(a retrieve or cancel of a stored response to `client.get`/`client.post`), and the upstream's response
bytes (SSE or JSON) come back as they arrive. The app is Starlette routes with plain ASGI responses;
`Server` runs it with uvicorn. Both are the optional `server` extra, imported only when an app is built
or served, so the rest of the package (and `moa-stream --help`) works without them. With a keys file
(`KeyRing`), each client token is a key with its own sessions and its own budget.
"""

from __future__ import annotations

from ._app import create_app
from ._asgi import (
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_PER_CLIENT,
    DEFAULT_PORT,
)
from ._command import add_serve_parser, run_serve
from ._keys import KeyRing, read_keys, token_digest
from ._runner import Server

__all__ = [
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONCURRENT_PER_CLIENT",
    "DEFAULT_PORT",
    "KeyRing",
    "Server",
    "add_serve_parser",
    "create_app",
    "read_keys",
    "run_serve",
    "token_digest",
]
