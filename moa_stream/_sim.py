"""The embedded OpenAI-compatible simulator: deterministic chat completions, scripted latency, faults.

Pure core with no HTTP library: `Simulator.handle` turns (method, path, headers, body) into a status,
headers and an async iterator of body bytes, so the in-process transport and the loopback server
share one implementation. It is the default upstream of the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import random
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any, Final, Literal, cast, get_args

import anyio
import msgspec

__all__ = [
    "Fault",
    "FaultKind",
    "SimDisconnect",
    "SimModel",
    "SimResponse",
    "SimStats",
    "SimTimeout",
    "Simulator",
    "default_simulator",
    "sim_token_count",
]

FaultKind = Literal[
    "http_429",
    "http_500",
    "disconnect",
    "stall",
    "malformed",
    "stream_error",
    "reject_stream_options",
    "no_usage",
    "usage_unasked",
    "invalid_utf8",
    "echo_key",
]
_FAULT_KINDS: Final[frozenset[str]] = frozenset(get_args(FaultKind))
_MID_STREAM_FAULTS: Final = frozenset({"disconnect", "stall", "malformed", "stream_error", "invalid_utf8"})


_SEEN = 1000


class Fault(msgspec.Struct, frozen=True, kw_only=True):
    """A failure the simulator injects: into every request for a model (`SimModel.fault`) or into
    one request (header `x-sim-fault: <kind>[;after=N][;stall=S]`, or `none` to switch it off).

    Kinds: `http_429`/`http_500` answer with that status before any byte; after `after_chunks`
    chunk events, `disconnect` drops the connection, `stall` goes silent for `stall_s`, `malformed`
    sends one event that is not JSON and carries on, `stream_error` sends an in-stream error event
    and ends without [DONE], `invalid_utf8` sends the next event together with one whose text holds
    half a multibyte character, in one read, and ends; `reject_stream_options` is a 400 for requests
    carrying `stream_options`; `no_usage` never reports usage (like the llama.cpp server);
    `usage_unasked` reports it whether asked or not (like vLLM with `--enable-force-include-usage`:
    a usage chunk always, no `usage` key on the others); `echo_key` is a 401 whose message echoes
    the request's credentials (as some gateways do). Non-streamed requests: a stall delays the
    reply, disconnect drops it, malformed and invalid_utf8 garble it.
    """

    kind: FaultKind
    """What goes wrong (see above)."""
    after_chunks: int = 0
    """For disconnect/stall/malformed/stream_error: how many SSE chunk events are sent first."""
    stall_s: float = 3600.0
    """For stall: how long the stream goes silent."""

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"Fault.kind must be one of {sorted(_FAULT_KINDS)}, got {self.kind!r}")
        if self.after_chunks < 0:
            raise ValueError(f"Fault.after_chunks must be >= 0, got {self.after_chunks!r}")
        if not self.stall_s >= 0:
            raise ValueError(f"Fault.stall_s must be >= 0, got {self.stall_s!r}")


class SimModel(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated model: its latency profile, reply length and optional fault."""

    name: str
    """The model name clients request."""
    ttft_s: float = 0.0
    """Delay before the first chunk (for non-streamed requests: before the response)."""
    tokens_per_s: float = 0.0
    """Generation speed; 0 means no delay between tokens."""
    jitter: float = 0.0
    """Sigma of a lognormal multiplier on `ttft_s`, seeded from the request (so reproducible)."""
    reply_tokens: int = 24
    """Reply length in words when the request sets no max_tokens/max_completion_tokens below it."""
    reasoning_tokens: int = 0
    """Words of `reasoning_content` streamed before the content (and counted in usage)."""
    fault: Fault | None = None
    """Injected into every request for this model unless the request's `x-sim-fault` overrides it."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("SimModel.name must be a non-empty string")
        for field in ("ttft_s", "tokens_per_s", "jitter"):
            value = getattr(self, field)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"SimModel.{field} must be a finite number >= 0, got {value!r}")
        if self.reply_tokens < 1:
            raise ValueError(f"SimModel.reply_tokens must be >= 1, got {self.reply_tokens!r}")
        if self.reasoning_tokens < 0:
            raise ValueError(f"SimModel.reasoning_tokens must be >= 0, got {self.reasoning_tokens!r}")


class SimResponse(msgspec.Struct, frozen=True, kw_only=True):
    """What `Simulator.handle` returns: a status and headers known up front, then the body."""

    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    """One item per SSE event, or the whole JSON document as a single item."""


@dataclasses.dataclass(slots=True)
class SimStats:
    """Counters for tests: what reached the simulator and what is still streaming."""

    requests: int = 0
    """Every call to `handle`, whatever the route or outcome."""
    open_streams: int = 0
    """Response bodies started and not yet finished or closed."""
    max_open_streams: int = 0
    """The most response bodies that were open at once."""
    requests_by_model: dict[str, int] = dataclasses.field(default_factory=dict)
    """Chat-completion requests per requested model name."""
    rejected_stream_options: int = 0
    """Requests answered 400 by the `reject_stream_options` fault."""


class SimDisconnect(Exception):
    """Raised by a body iterator to make the transport drop the connection mid-body."""


class SimTimeout(Exception):
    """Raised by `handle` or a body iterator when the next byte would come later than the caller's
    `read_timeout`, after waiting that long: the in-process stand-in for a socket read timeout."""


def sim_token_count(text: str) -> int:
    """The simulator's tokenizer: the number of whitespace-separated words in `text`."""
    return len(text.split())


# A fixed timestamp keeps identical requests byte-identical; nothing downstream needs wall time.
_CREATED: Final = 1_700_000_000
_VOCAB: Final = (
    "river", "stone", "light", "quiet", "garden", "signal", "paper", "window", "bright", "early",
    "market", "silver", "forest", "simple", "careful", "engine", "harbor", "winter", "answer", "gentle",
    "measure", "follow", "pattern", "steady", "travel", "little", "open", "reason", "summer", "corner",
    "thread", "balance", "mirror", "distant", "useful", "lantern", "meadow", "number", "orange", "planet",
    "record", "shadow", "table", "valley", "wonder", "yellow", "bridge", "castle", "cloud", "detail",
    "field", "honest", "island", "journey", "kettle", "ladder", "modest", "north", "ocean", "pocket",
    "rapid", "season", "tower", "vivid",
)  # fmt: skip
_TOOL_RESULT_PREFIX: Final = ("Based", "on", "the", "tool", "result,")

_json: Final = msgspec.json.Encoder()
_canonical: Final = msgspec.json.Encoder(order="deterministic")
_decoder: Final = msgspec.json.Decoder()

_DONE: Final = b"data: [DONE]\n\n"
_MALFORMED: Final = b"data: {not json\n\n"
_MALFORMED_JSON: Final = b"{not json"
_STREAM_ERROR: Final = (
    b'data: {"error": {"message": "simulated in-stream error", "type": "server_error", "code": "sim_error"}}\n\n'
)
_CHUNK_TAIL: Final = b',"logprobs":null,"finish_reason":null}]}\n\n'
# Once usage is asked for, OpenAI adds `"usage":null` to every chunk but the usage chunk.
_CHUNK_TAIL_ASKED: Final = b',"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
_BROKEN_UTF8: Final = "é".encode()[:1]
_INVALID_UTF8_EVENT: Final = (
    b'data: {"id":"chatcmpl-sim-broken","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"sim","choices":[{"index":0,"delta":{"content":" caf' + _BROKEN_UTF8 + b'"},"finish_reason":null}]}\n\n'
)


@dataclasses.dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    arguments: str
    fragments: list[str]


@dataclasses.dataclass(slots=True)
class _Plan:
    """Everything one chat completion will say, decided before the first byte."""

    id: str
    model: str
    content: list[str]
    reasoning: list[str]
    tool_call: _ToolCall | None
    finish_reason: str
    usage: dict[str, Any]
    ttft_s: float
    token_delay_s: float

    def token_events(self) -> int:
        tool = len(self.tool_call.fragments) if self.tool_call else 0
        return len(self.reasoning) + len(self.content) + tool


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
        problem = _validate(request)
        if problem is not None:
            return self._error(400, request_id, problem[1], param=problem[0])
        name: str = request["model"]
        self.stats.requests_by_model[name] = self.stats.requests_by_model.get(name, 0) + 1
        model = self._resolve(name)

        fault = model.fault
        override = next((v for k, v in headers.items() if k.lower() == "x-sim-fault"), None)
        if override is not None:
            try:
                fault = _parse_fault(override)
            except ValueError as exc:
                return self._error(400, request_id, f"Invalid x-sim-fault header: {exc}")
        if fault is not None:
            rejected = self._reject(fault, request_id, request, path, headers)
            if rejected is not None:
                return rejected

        plan = _plan(model, name, request)
        kind = fault.kind if fault is not None else None
        include_usage = kind != "no_usage"
        if not request.get("stream"):
            # Without a stream, "after N chunks" has no meaning: a stall delays the whole reply, a
            # disconnect drops it, malformed garbles it, and stream_error does not apply.
            delay = plan.ttft_s + plan.token_delay_s * max(plan.token_events() - 1, 0)
            if fault is not None and kind == "stall":
                delay += fault.stall_s
            if delay > 0:
                await _wait(delay, read_timeout)
            document = _completion(plan, include_usage=include_usage)
            garbled = None
            if kind == "malformed":
                garbled = _MALFORMED_JSON
            elif kind == "invalid_utf8":
                garbled = _json.encode(document).replace(b'"id":"', b'"id":"' + _BROKEN_UTF8, 1)
            return self._json(200, request_id, document, payload=garbled, drop=kind == "disconnect")

        options = request.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") is True
        forced = kind == "usage_unasked"
        events = _stream_events(plan, usage_chunk=include_usage and (asked or forced), null_usage=asked and not forced)
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
                        yield _STREAM_ERROR
                        return
                    if kind == "invalid_utf8":  # several events in one read, the last one broken
                        yield (event or b"") + _INVALID_UTF8_EVENT
                        return
                    if kind == "malformed":
                        yield _MALFORMED
                    else:
                        delay += stall_s
                if delay:
                    await _wait(delay, read_timeout)
                if event is None:
                    yield _DONE
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
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra: Iterable[tuple[str, str]] = (),
    ) -> SimResponse:
        error = {"message": message, "type": type_, "param": param, "code": code}
        return self._json(status, request_id, {"error": error}, extra)

    def _model_list(self) -> dict[str, Any]:
        data = [
            {"id": m.name, "object": "model", "created": _CREATED, "owned_by": "moa-stream-sim"}
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


# -- request parsing -------------------------------------------------------------------------


def _validate(request: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) of the first thing wrong with a chat request, as OpenAI would name it."""
    if not isinstance(request.get("model"), str) or not request["model"]:
        return "model", "you must provide a model parameter"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages", "'messages' must be a non-empty array"
    if not all(isinstance(m, dict) for m in messages):
        return "messages", "each entry of 'messages' must be an object"
    for param in ("max_tokens", "max_completion_tokens"):
        value = request.get(param)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return param, f"'{param}' must be an integer >= 1, got {value!r}"
    seed = request.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        return "seed", f"'seed' must be an integer, got {seed!r}"
    temperature = request.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or isinstance(temperature, bool)):
        return "temperature", f"'temperature' must be a number, got {temperature!r}"
    return None


def _parse_fault(value: str) -> Fault | None:
    """`<kind>[;after=N][;stall=S]`, or `none` to switch off the model's own fault."""
    kind, *options = (part.strip() for part in value.split(";"))
    if kind == "none":
        return None
    if kind not in _FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}")
    after, stall = 0, 3600.0
    for option in options:
        key, _, raw = option.partition("=")
        if key == "after":
            after = int(raw)
        elif key == "stall":
            stall = float(raw)
        else:
            raise ValueError(f"unknown option {option!r}")
    return Fault(kind=cast(FaultKind, kind), after_chunks=after, stall_s=stall)


def _message_texts(message: dict[str, Any]) -> Iterator[str]:
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            yield function["arguments"]


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    # OpenAI's chat accounting: a few tokens of framing per message and per reply.
    words = sum(sim_token_count(text) for m in messages for text in _message_texts(m))
    return 3 * len(messages) + words + 3


# -- generation ------------------------------------------------------------------------------


def _plan(model: SimModel, name: str, request: dict[str, Any]) -> _Plan:
    messages: list[dict[str, Any]] = request["messages"]
    temperature = request.get("temperature")
    key = [
        name,
        messages,
        request.get("seed"),
        None if temperature is None else float(temperature),
    ]
    digest = hashlib.sha256(_canonical.encode(key)).hexdigest()
    rng = random.Random(digest)

    tool_call = _tool_call(request, rng, digest)
    after_tool = messages[-1].get("role") == "tool"
    prefix = _TOOL_RESULT_PREFIX if after_tool else ()
    words = [*prefix, *(rng.choice(_VOCAB) for _ in range(model.reply_tokens - len(prefix)))]
    words = words[: model.reply_tokens]
    words[0] = words[0].capitalize()
    words[-1] += "."
    reasoning = [rng.choice(_VOCAB) for _ in range(model.reasoning_tokens)]

    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    if tool_call is not None:
        content: list[str] = []
        finish_reason = "tool_calls"
        completion = sim_token_count(tool_call.arguments)
    else:
        content = words if limit is None else words[:limit]
        finish_reason = "length" if len(content) < len(words) else "stop"
        completion = len(content)
    completion += len(reasoning)
    prompt = _prompt_tokens(messages)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": len(reasoning)},
    }
    multiplier = math.exp(rng.gauss(0.0, model.jitter)) if model.jitter else 1.0
    return _Plan(
        id=f"chatcmpl-sim-{digest[:24]}",
        model=name,
        content=content,
        reasoning=reasoning,
        tool_call=tool_call,
        finish_reason=finish_reason,
        usage=usage,
        ttft_s=model.ttft_s * multiplier,
        token_delay_s=1.0 / model.tokens_per_s if model.tokens_per_s > 0 else 0.0,
    )


def _tool_call(request: dict[str, Any], rng: random.Random, digest: str) -> _ToolCall | None:
    tools = request.get("tools")
    choice = request.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if request["messages"][-1].get("role") == "tool":
        return None
    functions = [t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not functions:
        return None
    function = functions[0]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        function = next((f for f in functions if f.get("name") == wanted), function)
    arguments = _arguments(function.get("parameters"), rng)
    # Cut points chosen by the rng so fragments differ between requests but not between runs.
    pieces = min(rng.randint(2, 4), len(arguments))
    cuts = sorted(rng.sample(range(1, len(arguments)), pieces - 1))
    bounds = [0, *cuts, len(arguments)]
    fragments = [arguments[a:b] for a, b in itertools.pairwise(bounds)]
    return _ToolCall(
        id=f"call_sim_{digest[:24]}",
        name=str(function.get("name", "")),
        arguments=arguments,
        fragments=fragments,
    )


def _arguments(schema: object, rng: random.Random) -> str:
    properties = schema.get("properties") if isinstance(schema, dict) else None
    arguments: dict[str, Any] = {}
    for key, spec in (properties if isinstance(properties, dict) else {}).items():
        spec = spec if isinstance(spec, dict) else {}
        kind = spec.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), None)
        enum = spec.get("enum")
        if isinstance(enum, list) and enum:
            arguments[key] = rng.choice(enum)
        elif kind == "string":
            arguments[key] = rng.choice(_VOCAB)
        elif kind in ("integer", "number"):
            arguments[key] = rng.randint(1, 9)
        elif kind == "boolean":
            arguments[key] = True
        else:
            arguments[key] = None
    # The stdlib's ", " / ": " separators make the arguments several words for the tokenizer.
    return json.dumps(arguments)


# -- encoding --------------------------------------------------------------------------------


def _stream_events(plan: _Plan, *, usage_chunk: bool, null_usage: bool) -> Iterator[tuple[bytes, float]]:
    """The SSE chunk events of a streamed completion with the delay before each (no [DONE]):
    `usage_chunk` adds the final usage chunk, `null_usage` a `"usage":null` key to the others."""
    head = b"".join(
        [
            b'data: {"id":',
            _json.encode(plan.id),
            b',"object":"chat.completion.chunk","created":',
            str(_CREATED).encode(),
            b',"model":',
            _json.encode(plan.model),
            b',"system_fingerprint":"fp_sim","choices":[{"index":0,"delta":',
        ]
    )
    encode = _json.encode
    delay = plan.token_delay_s
    gap = 0.0  # no delay before the first token: ttft covers it
    tail = _CHUNK_TAIL_ASKED if null_usage else _CHUNK_TAIL

    if plan.tool_call is None:
        yield head + b'{"role":"assistant","content":""}' + tail, plan.ttft_s
    else:
        yield head + b'{"role":"assistant","content":null}' + tail, plan.ttft_s
    for i, word in enumerate(plan.reasoning):
        token = " " + word if i else word
        yield head + b'{"reasoning_content":' + encode(token) + b"}" + tail, gap
        gap = delay
    for i, word in enumerate(plan.content):
        token = " " + word if i else word
        yield head + b'{"content":' + encode(token) + b"}" + tail, gap
        gap = delay
    call = plan.tool_call
    if call is not None:
        first = {
            "tool_calls": [
                {
                    "index": 0,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            ]
        }
        yield head + encode(first) + tail, 0.0
        for fragment in call.fragments:
            piece = {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
            yield head + encode(piece) + tail, gap
            gap = delay
    finish = b',"logprobs":null,"finish_reason":' + encode(plan.finish_reason) + b"}]"
    yield head + b"{}" + finish + (b',"usage":null}\n\n' if null_usage else b"}\n\n"), 0.0
    if usage_chunk:
        document = {
            "id": plan.id,
            "object": "chat.completion.chunk",
            "created": _CREATED,
            "model": plan.model,
            "system_fingerprint": "fp_sim",
            "choices": [],
            "usage": plan.usage,
        }
        yield b"data: " + encode(document) + b"\n\n", 0.0


def _completion(plan: _Plan, *, include_usage: bool) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": " ".join(plan.content) if plan.tool_call is None else None,
        "refusal": None,
    }
    if plan.reasoning:
        message["reasoning_content"] = " ".join(plan.reasoning)
    if plan.tool_call is not None:
        call = plan.tool_call
        function = {"name": call.name, "arguments": call.arguments}
        message["tool_calls"] = [{"id": call.id, "type": "function", "function": function}]
    document: dict[str, Any] = {
        "id": plan.id,
        "object": "chat.completion",
        "created": _CREATED,
        "model": plan.model,
        "system_fingerprint": "fp_sim",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}],
    }
    if include_usage:
        document["usage"] = plan.usage
    return document
