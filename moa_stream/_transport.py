"""The metering transport: the one point that every SDK path crosses on its way upstream.

`create`, `with_raw_response`, `with_streaming_response`, `.stream()`, `with_options` copies and a
framework's direct `client.post(...)` all end in the HTTP client's transport, so that is where chat
calls are recognised, rewritten (usage requested, session header removed) and teed.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import anyio

from ._budget import BudgetBreach
from ._ledger import SessionStateError
from ._meter import Engine
from ._moa import MOA_PREFIX, Presets, refusal_response, run_turn, session_error_response
from ._session import SESSION_HEADER, current_session
from ._upstream import Upstream, send_chat
from ._wire import any_decoder


def _is_chat(request: Any) -> bool:
    return bool(request.method == "POST" and request.url.path.endswith("/chat/completions"))


class MeteringTransport:
    """Base of the per-HTTP-library transports built by `metering_transport_class`."""

    _http: ModuleType

    def __init__(self, inner: Any, engine: Engine, presets: Presets) -> None:
        self.inner = inner
        self.engine = engine
        self.presets = presets
        self._closed = False

    async def handle_async_request(self, request: Any) -> Any:
        if _is_chat(request):
            return await self._chat(request)
        # The seam for more endpoints (Responses API): route here by path.
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Drain pending events and trace lines, then close the wrapped transport. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.engine.aclose()  # first: its tail readers may still be reading slot clients' streams
            await self.presets.aclose()
            await self.inner.aclose()

    async def _chat(self, request: Any) -> Any:
        body = await request.aread()
        try:
            payload = any_decoder.decode(body)
        except Exception:
            payload = None
        if not isinstance(payload, dict):
            payload = {}  # not ours to judge: the upstream answers it, and the call is still metered
        session_id = current_session(request.headers.get(SESSION_HEADER))
        upstream = Upstream.of_request(self._http, self.inner, request, drop=(SESSION_HEADER,))
        model = str(payload.get("model", ""))
        if model.startswith(MOA_PREFIX):
            return await run_turn(self.presets, self.engine, upstream, payload, body=body, session_id=session_id)

        messages = payload.get("messages")
        try:
            turn = self.engine.new_turn(session_id=session_id, model=model)
        except SessionStateError as exc:
            return session_error_response(self._http, exc)
        turn.note_inputs(body, upstream.secrets)
        try:
            call = turn.new_call(
                role="direct",
                label=model,
                provider=upstream.host,
                model=model,
                input_messages=messages if isinstance(messages, list) else [],
                streamed=payload.get("stream") is True,
                main=True,
                secrets=upstream.secrets,
            )
        except BudgetBreach as breach:
            turn.seal()  # a turn with no call and the refusal as its error
            return refusal_response(self._http, breach)
        turn.seal()
        return await send_chat(self.engine, call, upstream, payload, body=body)


@functools.cache
def metering_transport_class(module: ModuleType) -> type[MeteringTransport]:
    """A MeteringTransport that is also `module.AsyncBaseTransport`."""
    namespace = {"__module__": __name__, "_http": module}
    return type("MeteringTransport", (MeteringTransport, module.AsyncBaseTransport), namespace)
