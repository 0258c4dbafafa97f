"""The metering transport: the one point that every SDK path crosses on its way upstream.

`create`, `with_raw_response`, `with_streaming_response`, `.stream()`, `with_options` copies and a
framework's direct `client.post(...)` all end in the HTTP client's transport, so that is where chat
calls are recognised, rewritten (usage requested, session header removed) and teed. It holds the
engine and nothing else of it; other endpoints pass through untouched.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import anyio

from ._background import observe_background
from ._engine import Engine
from ._errors import Refusal
from ._facts import ResponsesRequest
from ._holds import max_output_of
from ._ledger import SessionStateError
from ._moa import MOA_PREFIX, run_moa_turn
from ._session import KEY_HEADER, SESSION_HEADER, current_session
from ._trace_context import current_trace_context
from ._upstream import Upstream, send_chat, send_responses
from ._wire import any_decoder


def _route(request: Any) -> str | None:
    """What a request is to us: a chat call, a Responses call, a look at a background response
    ("observe"), or None (passed through untouched)."""
    path = request.url.path
    if request.method == "POST":
        if path.endswith("/chat/completions"):
            return "chat"
        if path.endswith("/responses"):
            return "responses"
    if "/responses/" in path and (request.method == "GET" or path.endswith("/cancel")):
        return "observe"
    return None


def input_items(payload: dict[str, Any]) -> list[Any]:
    """A Responses request's `input` as a list of items (a string is one user message)."""
    given = payload.get("input")
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return given if isinstance(given, list) else []


class MeteringTransport:
    """Wraps the HTTP client's transport (made a transport of its HTTP module by `_sdk.for_module`).

    `moa_stream_engine` is the marker by which `_sdk` finds the engine; `owns_engine` is true for
    the client's main transport only, which closes the engine when the client closes.
    """

    _http: ModuleType

    def __init__(self, inner: Any, engine: Engine, *, owns_engine: bool) -> None:
        self.inner = inner
        self.moa_stream_engine = engine
        self._owns_engine = owns_engine
        self._closed = False

    async def handle_async_request(self, request: Any) -> Any:
        route = _route(request)
        if route == "chat" or route == "responses":
            return await self._metered(request, route)
        if route == "observe":
            return await observe_background(self.moa_stream_engine, self._http, self.inner, request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the engine (main transport only: end what is in flight, drain every event), then
        the wrapped transport. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._owns_engine:
                await self.moa_stream_engine.aclose()
            await self.inner.aclose()

    async def _metered(self, request: Any, api: str) -> Any:
        engine = self.moa_stream_engine
        body = await request.aread()
        try:
            payload = any_decoder.decode(body)
        except Exception:
            payload = None
        if not isinstance(payload, dict):
            payload = {}  # not ours to judge: the upstream answers it, and the call is still metered
        session_header = request.headers.get(SESSION_HEADER)
        session_id = current_session(session_header)
        key_id = request.headers.get(KEY_HEADER)
        drop = tuple(name for name in (SESSION_HEADER, KEY_HEADER) if name in request.headers)
        upstream = Upstream.of_request(self._http, self.inner, request, drop=drop)
        try:
            await engine.open_session(session_id)
        except SessionStateError as exc:
            return exc.response(self._http)
        model = str(payload.get("model", ""))
        parent = current_trace_context() if engine.wants_trace_context else None
        if model.startswith(MOA_PREFIX):
            return await run_moa_turn(
                engine, upstream, payload, body=body, session_id=session_id, key_id=key_id, api=api, parent=parent
            )
        try:
            turn = engine.new_turn(session_id=session_id, model=model, key_id=key_id, parent=parent)
        except SessionStateError as exc:
            return exc.response(self._http)
        turn.note_inputs(body, upstream.secrets)
        if api == "chat":
            messages = payload.get("messages")
            inputs, request_facts = (messages if isinstance(messages, list) else []), None
        else:
            inputs, request_facts = input_items(payload), ResponsesRequest.of(payload)
        try:
            call = await turn.new_call(
                role="direct",
                label=model,
                provider=upstream.host,
                model=model,
                input_messages=inputs,
                streamed=payload.get("stream") is True,
                main=True,
                secrets=upstream.secrets,
                responses=request_facts,
                max_output_tokens=max_output_of(payload),
            )
        except Refusal as refused:
            turn.seal()  # a turn with no call and the refusal as its error
            return refused.response(self._http)
        turn.seal()
        if api == "chat":
            return await send_chat(engine.quirks, call, upstream, payload, body=body)
        return await send_responses(call, upstream, payload, body=body)
