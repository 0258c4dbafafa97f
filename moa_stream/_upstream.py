"""Upstreams and the way a metered call is sent to them.

An upstream is where requests go: the caller's own (the URL, headers and transport of the request
being handled) or a MoA slot's own client; either endpoint, chat completions or responses, under its
base URL. `send_chat` asks for usage on the caller's behalf, falls back when an upstream rejects
`stream_options`, and returns the response teed; `send_responses` returns it teed as it is.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any
from urllib.parse import quote

import openai

from ._chat_reader import ChatReader, Relabel, UsageLearner
from ._meter import Call
from ._quirks import UpstreamQuirks
from ._responses_reader import ResponsesReader
from ._sdk import for_module, route_of
from ._tee import Reader, TeeStream
from ._wire import json_encoder

_ENDPOINTS = ("/chat/completions", "/responses")


class Upstream:
    """Where requests go: a transport, a URL (under which both endpoints are) and the headers to send."""

    def __init__(
        self,
        *,
        http: ModuleType,
        transport: Any,
        url: Any,
        headers: Any,
        extensions: dict[str, Any],
        drop: tuple[str, ...] = (),
        original: Any = None,
    ) -> None:
        self.http = http
        self.transport = transport
        self.url = url
        self._source_headers = headers
        self._drop = drop
        self._headers: Any = None
        self.extensions = extensions
        self._original = original
        """The caller's own request, sent as it is when nothing in it needs changing."""
        path = url.path
        self._prefix = next((path[: -len(e)] for e in _ENDPOINTS if path.endswith(e)), path.rstrip("/"))
        self._endpoint = path[len(self._prefix) :]
        self._urls = {self._endpoint: url}  # made once each: building a URL is not cheap
        self.origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        self.host: str = url.host
        self.secrets = _credentials(headers, url)
        """The credential values its requests carry, to be kept out of events and traces."""

    @property
    def headers(self) -> Any:
        """The headers every request sends, less the `drop` ones (copied on first use: a request
        forwarded as it is never needs them)."""
        if self._headers is None:
            headers = self._source_headers.copy()
            for name in ("content-length", "transfer-encoding", *self._drop):
                headers.pop(name, None)
            self._headers = headers
        return self._headers

    @classmethod
    def of_request(cls, http: ModuleType, transport: Any, request: Any, *, drop: tuple[str, ...] = ()) -> Upstream:
        """The upstream a caller's request was addressed to, less the `drop` headers (ours, not its:
        a request that carries none of them may be forwarded as it is)."""
        return cls(
            http=http,
            transport=transport,
            url=request.url,
            headers=request.headers,
            extensions=request.extensions,
            drop=drop,
            original=None if drop else request,
        )

    @classmethod
    def of_client(cls, client: openai.AsyncOpenAI) -> Upstream:
        """A slot's own client: its base URL, its credentials, its connection pool (below its
        metering, when it is a wrapped client, so that its calls are not metered twice)."""
        http, transport, request = route_of(client, "chat/completions")
        return cls(
            http=http, transport=transport, url=request.url, headers=request.headers, extensions=request.extensions
        )

    def url_for(self, endpoint: str) -> Any:
        """The URL of `endpoint` ("/chat/completions", "/responses") under this upstream's base,
        with the same query (Azure's `api-version`, a `key`)."""
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = self.url.copy_with(path=self._prefix + endpoint)
        return url

    def request(
        self, body: bytes, *, identity: bool, endpoint: str = "/chat/completions", extra: dict[str, str] | None = None
    ) -> Any:
        """A request of `body` to `endpoint`, with this upstream's headers and the `extra` ones."""
        original = self._original
        if (
            original is not None
            and not identity
            and endpoint == self._endpoint
            and body is original.content
            and not extra
        ):
            return original  # the caller's bytes to the caller's URL: nothing to rebuild
        headers = self.headers.copy()
        if extra:
            headers.update(extra)
        if identity:
            # A compressed event stream could not be teed chunk by chunk, nor a body rewritten.
            headers["accept-encoding"] = "identity"
        headers["content-length"] = str(len(body))
        url = self.url_for(endpoint)
        # A stream, not `content=`: the request's own header preparation costs more than the rest.
        stream = self.http.ByteStream(body)
        return self.http.Request("POST", url, headers=headers, stream=stream, extensions=self.extensions)


# Where OpenAI-compatible APIs take a key: bearer tokens, Azure's and gateways' key headers, and a
# `key` query parameter (Gemini's OpenAI-compatible endpoint and some gateways).
_SECRET_HEADERS = ("authorization", "proxy-authorization", "api-key", "x-api-key")
_SECRET_HEADER_BYTES = frozenset(name.encode() for name in _SECRET_HEADERS)
_SECRET_PARAMS = ("key", "api_key", "api-key", "apikey", "access_token")
# Shorter values ("none", "EMPTY" for keyless local servers) would turn ordinary words into [REDACTED].
_MIN_SECRET_CHARS = 8


def _header_text(raw: bytes) -> str:
    # As httpx decodes header values: UTF-8 (ASCII included), else Latin-1.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _credentials(headers: Any, url: Any) -> tuple[str, ...]:
    found: list[str] = []
    for raw_name, raw_value in headers.raw:  # one pass over the bytes: a lookup per name would scan them all
        if raw_value and raw_name.lower() in _SECRET_HEADER_BYTES:
            value = _header_text(raw_value)
            scheme, _, token = value.partition(" ")
            found.append(token.strip() if token.strip() and scheme.lower() in ("bearer", "basic", "token") else value)
    if url.query:
        params = url.params
        for name in _SECRET_PARAMS:
            value = params.get(name)
            if value:
                found += [value, quote(value, safe="")]
    return tuple(dict.fromkeys(value for value in found if len(value) >= _MIN_SECRET_CHARS))


async def send_chat(
    quirks: UpstreamQuirks,
    call: Call,
    upstream: Upstream,
    payload: dict[str, Any],
    *,
    body: bytes | None = None,
    rewrite_usage: Relabel | None = None,
    caller_sees: bool | None = None,
) -> Any:
    """Send one chat request as `call` and return its response, teed into the call.

    `body` is the caller's original bytes, forwarded as they are when nothing needs changing.
    `rewrite_usage` says what usage (and model) the caller should see.

    Usage is asked for on the caller's behalf when the caller did not ask, and what that adds is
    taken out of what the caller reads; a reference's stream is ours alone. What an upstream sends
    unasked is learned from its first such stream, sent as the caller wrote it (its usage is then
    estimated unless the upstream sends it anyway).
    """
    streamed = payload.get("stream") is True
    options = payload.get("stream_options")
    asked_usage = isinstance(options, dict) and options.get("include_usage") is True
    origin, model = upstream.origin, str(payload.get("model", ""))
    inject = streamed and not asked_usage and not quirks.rejects_stream_options(origin)
    drop_null_usage = False
    learn: UsageLearner | None = None
    # What the caller reads must be the bare SDK's; a reference's stream (or one the bridge
    # translates) is read by us alone.
    if inject and (call.role != "reference" if caller_sees is None else caller_sees):
        unasked = quirks.unasked_usage(origin, model)
        if unasked is None:  # first sight: send it as the caller wrote it, and learn
            inject = False
            learn = functools.partial(_learn_unasked, quirks, origin, model)
        elif unasked.chunk:  # the usage comes anyway, as the bare SDK's caller sees it
            inject = False
        else:
            drop_null_usage = not unasked.key
    plain = body if body is not None else json_encoder.encode(payload)
    first = plain
    if inject:
        first = json_encoder.encode({**payload, "stream_options": {**(options or {}), "include_usage": True}})

    identity = streamed or rewrite_usage is not None
    extra = call.turn.upstream_headers
    response = await _send(call, upstream, upstream.request(first, identity=identity, extra=extra))
    if inject and response.status_code == 400:
        raw = await _read_raw(response)
        if b"stream_options" not in raw:
            replay = upstream.http.Response(400, headers=response.headers, stream=upstream.http.ByteStream(raw))
            return _teed(upstream.http, call, replay, ChatReader(call))
        quirks.learn_rejects_stream_options(origin)
        inject = drop_null_usage = False
        response = await _send(call, upstream, upstream.request(plain, identity=identity, extra=extra))
    ok = response.status_code < 400
    reader = ChatReader(
        call,
        strip_usage=inject,
        drop_null_usage=drop_null_usage,
        rewrite_usage=rewrite_usage if ok else None,
        learn_usage=learn,
    )
    return _teed(upstream.http, call, response, reader)


async def send_responses(
    call: Call,
    upstream: Upstream,
    payload: dict[str, Any],
    *,
    body: bytes | None = None,
    rewrite_usage: Relabel | None = None,
) -> Any:
    """Send one Responses API request as `call` and return its response, teed into the call.

    The Responses API reports usage in every finished response, so the request goes as it is."""
    streamed = payload.get("stream") is True
    content = body if body is not None else json_encoder.encode(payload)
    identity = streamed or rewrite_usage is not None
    request = upstream.request(content, identity=identity, endpoint="/responses", extra=call.turn.upstream_headers)
    response = await _send(call, upstream, request)
    rewrite = rewrite_usage if response.status_code < 400 else None
    return _teed(upstream.http, call, response, ResponsesReader(call, rewrite_usage=rewrite))


def _learn_unasked(quirks: UpstreamQuirks, origin: str, model: str, chunk: bool, key: bool) -> None:
    quirks.learn_unasked_usage(origin, model, chunk=chunk, key=key)


async def _send(call: Call, upstream: Upstream, request: Any) -> Any:
    try:
        response = await upstream.transport.handle_async_request(request)
    except BaseException as exc:
        call.end(*call.interrupted(exc))
        raise
    call.http_status = response.status_code
    call.request_id = response.headers.get("x-request-id")
    return response


def _teed(http: ModuleType, call: Call, response: Any, reader: Reader) -> Any:
    """`response` with its body teed into `call` through `reader`."""
    sse = response.status_code < 400 and response.headers.get("content-type", "").startswith("text/event-stream")
    tee = for_module(TeeStream, http, "AsyncByteStream")(
        response.stream, call, reader, sse=sse, content_encoding=response.headers.get("content-encoding")
    )
    headers = response.headers
    if reader.holds_body and not sse:
        headers = headers.copy()
        headers.pop("content-length", None)  # the rewritten body has another length
    # A new response, since one built from bytes (mock transports) would bypass its stream.
    return http.Response(response.status_code, headers=headers, stream=tee, extensions=response.extensions)


async def _read_raw(response: Any) -> bytes:
    parts = [part async for part in response.stream]
    await response.stream.aclose()
    return b"".join(parts)
