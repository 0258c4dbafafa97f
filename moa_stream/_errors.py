"""The package's own exceptions, and every OpenAI-shaped error it builds (library, server, simulator)."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()


class ConfigError(ValueError):
    """An invalid configuration; the one-line message names the source, preset, field and value."""


class ClientClosedError(RuntimeError):
    """A call or turn was asked of a wrapped client that has been closed."""


def error_document(
    status: int, message: str, *, type_: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`; the type defaults to
    `invalid_request_error` below 500 and `server_error` from 500 on, as OpenAI's do."""
    kind = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_json(
    status: int, message: str, *, type_: str | None = None, param: str | None = None, code: str | None = None
) -> bytes:
    """`error_document` encoded as JSON."""
    return _encoder.encode(error_document(status, message, type_=type_, param=param, code=code))


def error_response(
    http: ModuleType,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    document: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """An error answered by the library itself, as an `http.Response`; the caller's SDK raises it as
    the matching APIStatusError, and never retries it (the work behind it is already done)."""
    body = _encoder.encode(
        document if document is not None else error_document(status, message, param=param, code=code)
    )
    all_headers = {"content-type": "application/json", "x-should-retry": "false", **(headers or {})}
    return http.Response(status, headers=all_headers, content=body)


class Refusal(Exception):
    """A call refused before it was sent (a budget limit, an unreachable store); internal, the
    caller gets `response()` as its answer."""

    def message(self) -> str:
        return str(self)

    def response(self, http: ModuleType) -> Any:
        raise NotImplementedError


class StoreUnavailable(Refusal):
    """The shared store could not be reached, and a hard limit needs it (`store_unavailable =
    "closed"`): the call is refused with a 503 that names the store."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        super().__init__(
            f"moa_stream: the store at {where} is unavailable ({reason}); hard budget limits need it, "
            f"so the call was not sent (store_unavailable = 'closed')"
        )

    def response(self, http: ModuleType) -> Any:
        return error_response(http, 503, str(self), code="store_unavailable")
