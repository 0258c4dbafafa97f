"""The embedded OpenAI-compatible simulator: deterministic chat completions and Responses, scripted
latency, faults.

Pure core with no HTTP library: `Simulator.handle` turns (method, path, headers, body) into a status,
headers and an async iterator of body bytes, so the in-process transport and the loopback server
share one implementation. It is the default upstream of the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import collections
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import anyio
import msgspec

from ._bodies import CHAT, RESPONSES, Bodies
from ._chat import CREATED, completion, plan, stream_events, validate
from ._models import Fault, SimModel, SimResponse, parse_fault
from ._responses import Kept, ResponseStore, chat_request, id_for, reply_messages
from ._responses import validate as validate_responses
from ._responses_wire import Rendition

_SEEN = 1000
_decoder = msgspec.json.Decoder()
_RESPONSES_ROUTE: Final = re.compile(r"/responses(?:/(?P<id>[^/]+)(?P<cancel>/cancel)?)?$")


class Simulator(Bodies):
    """An OpenAI-compatible chat-completions and Responses server without the network.

    Routes: `POST .../chat/completions`, `GET .../models`, and the Responses API: `POST .../responses`,
    `GET .../responses/{id}` (with `?stream=true[&starting_after=N]` it replays a background
    response's events) and `POST .../responses/{id}/cancel`; anything else is a 404 in OpenAI's
    error shape, and so is every Responses route with `responses=False` (an upstream without it).
    Output is a deterministic function of (model, messages, seed, temperature); a Responses request
    is planned as the equivalent chat request. The last 1,000 responses are kept by id, for
    `previous_response_id`, `retrieve` and `cancel`; a background one finishes once its simulated
    generation time has passed on the event loop's clock. Unknown model names use `default` (or a
    zero-latency `SimModel` of that name).
    """

    def __init__(
        self, models: Iterable[SimModel] = (), *, default: SimModel | None = None, responses: bool = True
    ) -> None:
        super().__init__()
        self._models: dict[str, SimModel] = {}
        for model in models:
            if model.name in self._models:
                raise ValueError(f"Simulator models: duplicate model name {model.name!r}")
            self._models[model.name] = model
        self._default = default
        # Bounded, so that a long load run does not grow without end.
        self.requests_seen: collections.deque[Any] = collections.deque(maxlen=_SEEN)
        """Decoded JSON bodies of the last chat and Responses create requests received, in order."""
        self.headers_seen: collections.deque[dict[str, str]] = collections.deque(maxlen=_SEEN)
        """Headers of the last chat and Responses create requests received (names lower-cased), in order."""
        self._responses = responses
        self._kept = ResponseStore()

    @property
    def models(self) -> tuple[SimModel, ...]:
        """The named models, as listed by `GET /models`."""
        return tuple(self._models.values())

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
        matched = _RESPONSES_ROUTE.search(route) if self._responses else None
        if matched is not None:
            kept_id, cancel = matched["id"], matched["cancel"] is not None
            if method == "POST" and kept_id is None:
                return await self._create_response(request_id, path, headers, body, read_timeout)
            if method == "GET" and kept_id is not None and not cancel:
                return self._retrieve_response(request_id, kept_id, path.partition("?")[2], read_timeout)
            if method == "POST" and kept_id is not None and cancel:
                return self._cancel_response(request_id, kept_id)
        return self._error(404, request_id, f"Invalid URL ({method} {path})")

    # -- chat completions -------------------------------------------------------------------

    async def _chat(
        self, request_id: str, path: str, headers: Mapping[str, str], body: bytes, read_timeout: float | None
    ) -> SimResponse:
        accepted = self._accept(request_id, path, headers, body, validate, chat=True)
        if isinstance(accepted, SimResponse):
            return accepted
        request, model, fault = accepted
        planned = plan(model, request["model"], request)
        kind = fault.kind if fault is not None else None
        include_usage = kind != "no_usage"
        if not request.get("stream"):
            delay = planned.ttft_s + planned.token_delay_s * max(planned.token_events() - 1, 0)
            document = completion(planned, include_usage=include_usage)
            return await self._whole(request_id, document, delay, fault, read_timeout)

        options = request.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") is True
        forced = kind == "usage_unasked"
        events = stream_events(
            planned, usage_chunk=include_usage and (asked or forced), null_usage=asked and not forced
        )
        return self._sse(request_id, self._stream(events, fault, read_timeout, CHAT))

    def _accept(
        self,
        request_id: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        check: Callable[[dict[str, Any]], tuple[str, str] | None],
        *,
        chat: bool,
    ) -> SimResponse | tuple[dict[str, Any], SimModel, Fault | None]:
        """A create request's decoded body, model and fault; or the error it is answered with."""
        try:
            request = _decoder.decode(body)
        except msgspec.DecodeError as exc:
            return self._error(400, request_id, f"We could not parse the JSON body of your request: {exc}")
        if not isinstance(request, dict):
            return self._error(400, request_id, "The request body must be a JSON object.")
        self.requests_seen.append(request)
        self.headers_seen.append({k.lower(): v for k, v in headers.items()})
        problem = check(request)
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
            rejected = self._reject(fault, request_id, request, path, headers, chat=chat)
            if rejected is not None:
                return rejected
        return request, model, fault

    # -- responses ------------------------------------------------------------------------------

    async def _create_response(
        self, request_id: str, path: str, headers: Mapping[str, str], body: bytes, read_timeout: float | None
    ) -> SimResponse:
        accepted = self._accept(request_id, path, headers, body, validate_responses, chat=False)
        if isinstance(accepted, SimResponse):
            return accepted
        request, model, fault = accepted
        history: list[dict[str, Any]] = []
        previous_id = request.get("previous_response_id")
        if previous_id is not None:
            previous = self._kept.get(previous_id)
            if previous is None:
                message = f"Previous response with id '{previous_id}' not found."
                return self._error(400, request_id, message, param="previous_response_id")
            history = previous.conversation
        chat, conversation = chat_request(request, history)
        if not chat["messages"]:
            return self._error(400, request_id, "'input' must hold at least one message", param="input")
        planned = plan(model, request["model"], chat)
        include_usage = fault is None or fault.kind != "no_usage"
        rendition = Rendition(id=id_for(request), plan=planned, request=request, include_usage=include_usage)
        kept = Kept(rendition, [*conversation, *reply_messages(planned)], rendition.events(), anyio.current_time())
        if request.get("store") is not False or rendition.background:
            self._kept.keep(kept)
        if request.get("stream"):
            events = kept.replay(-1) if rendition.background else iter(kept.events)
            return self._sse(request_id, self._stream(events, fault, read_timeout, RESPONSES))
        if rendition.background:
            return await self._whole(request_id, rendition.document("queued"), 0.0, fault, read_timeout)
        return await self._whole(request_id, rendition.document(), kept.duration, fault, read_timeout)

    def _retrieve_response(self, request_id: str, kept_id: str, query: str, read_timeout: float | None) -> SimResponse:
        kept = self._kept.get(kept_id)
        if kept is None:
            return self._error(404, request_id, f"Response with id '{kept_id}' not found.")
        params = urllib.parse.parse_qs(query)
        if params.get("stream", ["false"])[-1] != "true":
            return self._json(200, request_id, kept.document())
        if not kept.rendition.background:
            message = "This response cannot be streamed because it was not created with background=true."
            return self._error(400, request_id, message, param="stream")
        try:
            after = int(params.get("starting_after", ["-1"])[-1])
        except ValueError:
            return self._error(400, request_id, "'starting_after' must be an integer", param="starting_after")
        return self._sse(request_id, self._stream(kept.replay(after), None, read_timeout, RESPONSES))

    def _cancel_response(self, request_id: str, kept_id: str) -> SimResponse:
        kept = self._kept.get(kept_id)
        if kept is None:
            return self._error(404, request_id, f"Response with id '{kept_id}' not found.")
        return self._json(200, request_id, kept.cancel())

    def _reject(
        self,
        fault: Fault,
        request_id: str,
        request: dict[str, Any],
        path: str,
        headers: Mapping[str, str],
        *,
        chat: bool,
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
        # The Responses API has no include_usage in its stream_options: nothing there to reject.
        if fault.kind == "reject_stream_options" and chat and "stream_options" in request:
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

    def _model_list(self) -> dict[str, Any]:
        data = [
            {"id": m.name, "object": "model", "created": CREATED, "owned_by": "moa-stream-sim"}
            for m in self._models.values()
        ]
        return {"object": "list", "data": data}


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
