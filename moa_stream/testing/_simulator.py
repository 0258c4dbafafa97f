"""The embedded OpenAI-compatible simulator: deterministic chat completions, scripted latency, faults.

Pure core with no HTTP library: `Simulator.handle` turns (method, path, headers, body) into a status,
headers and an async iterator of body bytes, so the in-process transport and the loopback server
share one implementation. It is the default upstream of the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import anyio
import msgspec

from .._errors import error_json
from ._chat import (
    BROKEN_UTF8,
    CREATED,
    DONE,
    INVALID_UTF8_EVENT,
    MALFORMED,
    MALFORMED_JSON,
    STREAM_ERROR,
    completion,
    plan,
    stream_events,
    validate,
)
from ._models import _MID_STREAM_FAULTS, Fault, SimDisconnect, SimModel, SimResponse, SimStats, SimTimeout, parse_fault

_SEEN = 1000
_json = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class Simulator:
    """An OpenAI-compatible chat-completions server without the network.

    Routes: `POST .../chat/completions` and `GET .../models`; anything else is a 404 in OpenAI's
    error shape. Output is a deterministic function of (model, messages, seed, temperature).
    Unknown model names use `default` (or a zero-latency `SimModel` of that name).
    """

    def __init__(self, models: Iterable[SimModel] = (), *, default: SimModel | None = None) -> None:
        self._models: dict[str, SimModel] = {}
        for model in models:
            if model.name in self._models:
                raise ValueError(f"Simulator models: duplicate model name {model.name!r}")
            self._models[model.name] = model
        self._default = default
        self.stats = SimStats()
        # Bounded, so that a long load run does not grow without end.
        self.requests_seen: collections.deque[Any] = collections.deque(maxlen=_SEEN)
        """Decoded JSON bodies of the last chat requests received, in order."""
        self.headers_seen: collections.deque[dict[str, str]] = collections.deque(maxlen=_SEEN)
        """Headers of the last chat requests received (names lower-cased), in order."""
        self._idle: anyio.Event | None = None

    @property
    def models(self) -> tuple[SimModel, ...]:
        """The named models, as listed by `GET /models`."""
        return tuple(self._models.values())

    async def wait_idle(self) -> None:
        """Return once no response body is open; lets tests wait for cleanup without sleeping.

        Call it from the event loop that iterates the bodies (the event is not thread-safe).
        """
        while self.stats.open_streams:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        read_timeout: float | None = None,
    ) -> SimResponse:
        """Answer one HTTP request; the body iterator does the streaming (and the faults).

        With `read_timeout`, any wait for the response or for the next body item that would be
        longer raises `SimTimeout` after `read_timeout` seconds (transports without sockets use it
        to honour the client's read timeout).
        """
        self.stats.requests += 1
        request_id = f"sim-req-{self.stats.requests}"
        route = path.partition("?")[0].rstrip("/")
        if method == "POST" and route.endswith("/chat/completions"):
            return await self._chat(request_id, path, headers, body, read_timeout)
        if method == "GET" and route.endswith("/models"):
            return self._json(200, request_id, self._model_list())
        return self._error(404, request_id, f"Invalid URL ({method} {path})")

    # -- chat completions -------------------------------------------------------------------

    async def _chat(
        self, request_id: str, path: str, headers: Mapping[str, str], body: bytes, read_timeout: float | None
    ) -> SimResponse:
        try:
            request = _decoder.decode(body)
        except msgspec.DecodeError as exc:
            return self._error(400, request_id, f"We could not parse the JSON body of your request: {exc}")
        if not isinstance(request, dict):
            return self._error(400, request_id, "The request body must be a JSON object.")
        self.requests_seen.append(request)
        self.headers_seen.append({k.lower(): v for k, v in headers.items()})
        problem = validate(request)
        if problem is not None:
            return self._error(400, request_id, problem[1], param=problem[0])
        name: str = request["model"]
        self.stats.requests_by_model[name] = self.stats.requests_by_model.get(name, 0) + 1
        model = self._resolve(name)

        fault = model.fault
        override = next((v for k, v in headers.items() if k.lower() == "x-sim-fault"), None)
        if override is not None:
            try:
                fault = parse_fault(override)
            except ValueError as exc:
                return self._error(400, request_id, f"Invalid x-sim-fault header: {exc}")
        if fault is not None:
            rejected = self._reject(fault, request_id, request, path, headers)
            if rejected is not None:
                return rejected

        planned = plan(model, name, request)
        kind = fault.kind if fault is not None else None
        include_usage = kind != "no_usage"
        if not request.get("stream"):
            # Without a stream, "after N chunks" has no meaning: a stall delays the whole reply, a
            # disconnect drops it, malformed garbles it, and stream_error does not apply.
            delay = planned.ttft_s + planned.token_delay_s * max(planned.token_events() - 1, 0)
            if fault is not None and kind == "stall":
                delay += fault.stall_s
            if delay > 0:
                await _wait(delay, read_timeout)
            document = completion(planned, include_usage=include_usage)
            garbled = None
            if kind == "malformed":
                garbled = MALFORMED_JSON
            elif kind == "invalid_utf8":
                garbled = _json.encode(document).replace(b'"id":"', b'"id":"' + BROKEN_UTF8, 1)
            return self._json(200, request_id, document, payload=garbled, drop=kind == "disconnect")

        options = request.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") is True
        forced = kind == "usage_unasked"
        events = stream_events(
            planned, usage_chunk=include_usage and (asked or forced), null_usage=asked and not forced
        )
        mid_stream = fault if fault is not None and fault.kind in _MID_STREAM_FAULTS else None
        sse_headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("x-request-id", request_id),
        ]
        return SimResponse(status=200, headers=sse_headers, body=self._stream(events, mid_stream, read_timeout))

    def _reject(
        self, fault: Fault, request_id: str, request: dict[str, Any], path: str, headers: Mapping[str, str]
    ) -> SimResponse | None:
        """The faults that answer with an HTTP error before any byte of the body."""
        if fault.kind == "echo_key":
            sent = {k.lower(): v for k, v in headers.items() if k.lower() in ("authorization", "api-key")}
            return self._error(
                401,
                request_id,
                f"Incorrect API key provided (simulated gateway echo): {sent} on {path}",
                code="invalid_api_key",
            )
        if fault.kind == "http_429":
            # retry-after-ms wins in the openai SDK; "retry-after: 0" alone means its 0.5 s backoff.
            return self._error(
                429,
                request_id,
                "Rate limit reached for requests (simulated).",
                type_="requests",
                code="rate_limit_exceeded",
                extra=[("retry-after", "0"), ("retry-after-ms", "1")],
            )
        if fault.kind == "http_500":
            return self._error(
                500,
                request_id,
                "The server had an error while processing your request (simulated).",
                type_="server_error",
            )
        if fault.kind == "reject_stream_options" and "stream_options" in request:
            self.stats.rejected_stream_options += 1
            return self._error(
                400,
                request_id,
                "Unrecognized request argument supplied: stream_options",
                param="stream_options",
            )
        return None

    def _resolve(self, name: str) -> SimModel:
        model = self._models.get(name)
        if model is not None:
            return model
        return self._default if self._default is not None else SimModel(name=name)

    # -- bodies ---------------------------------------------------------------------------------

    async def _stream(
        self, events: Iterator[tuple[bytes, float]], fault: Fault | None, read_timeout: float | None
    ) -> AsyncIterator[bytes]:
        self._stream_opened()
        try:
            # The trailing None is the [DONE] slot, so a fault whose `after_chunks` is past the
            # last chunk still fires (instead of [DONE]).
            for sent, (event, delay) in enumerate(itertools.chain(events, ((None, 0.0),))):
                if fault is not None and sent == fault.after_chunks:
                    kind, stall_s, fault = fault.kind, fault.stall_s, None
                    if kind == "disconnect":
                        raise SimDisconnect(f"simulated disconnect after {sent} chunks")
                    if kind == "stream_error":
                        yield STREAM_ERROR
                        return
                    if kind == "invalid_utf8":  # several events in one read, the last one broken
                        yield (event or b"") + INVALID_UTF8_EVENT
                        return
                    if kind == "malformed":
                        yield MALFORMED
                    else:
                        delay += stall_s
                if delay:
                    await _wait(delay, read_timeout)
                if event is None:
                    yield DONE
                    return
                yield event
        finally:
            self._stream_closed()

    async def _single(self, payload: bytes, *, drop: bool = False) -> AsyncIterator[bytes]:
        self._stream_opened()
        try:
            if drop:
                raise SimDisconnect("simulated disconnect before the body")
            yield payload
        finally:
            self._stream_closed()

    def _stream_opened(self) -> None:
        self.stats.open_streams += 1
        self.stats.max_open_streams = max(self.stats.max_open_streams, self.stats.open_streams)

    def _stream_closed(self) -> None:
        self.stats.open_streams -= 1
        if self.stats.open_streams == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    def _json(
        self,
        status: int,
        request_id: str,
        document: Any,
        extra: Iterable[tuple[str, str]] = (),
        *,
        payload: bytes | None = None,
        drop: bool = False,
    ) -> SimResponse:
        """A JSON response; `payload` replaces the encoded document (malformed fault), `drop`
        cuts the connection after the headers (disconnect fault)."""
        if payload is None:
            payload = _json.encode(document)
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            ("x-request-id", request_id),
            *extra,
        ]
        return SimResponse(status=status, headers=headers, body=self._single(payload, drop=drop))

    def _error(
        self,
        status: int,
        request_id: str,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        extra: Iterable[tuple[str, str]] = (),
    ) -> SimResponse:
        payload = error_json(status, message, type_=type_, param=param, code=code)
        return self._json(status, request_id, None, extra, payload=payload)

    def _model_list(self) -> dict[str, Any]:
        data = [
            {"id": m.name, "object": "model", "created": CREATED, "owned_by": "moa-stream-sim"}
            for m in self._models.values()
        ]
        return {"object": "list", "data": data}


async def _wait(delay: float, read_timeout: float | None) -> None:
    if read_timeout is not None and delay > read_timeout:
        await anyio.sleep(read_timeout)
        raise SimTimeout(f"simulated read timeout: no data for {read_timeout} s")
    await anyio.sleep(delay)


def default_simulator() -> Simulator:
    """The demo's upstream: four models with realistic latency; unknown names answer instantly."""
    return Simulator(
        [
            SimModel(name="sim-small", ttft_s=0.15, tokens_per_s=60.0),
            SimModel(name="sim-medium", ttft_s=0.3, tokens_per_s=40.0),
            SimModel(name="sim-large", ttft_s=0.6, tokens_per_s=25.0, jitter=0.3),
            SimModel(name="sim-reasoner", ttft_s=0.4, tokens_per_s=50.0, reasoning_tokens=16),
        ]
    )
