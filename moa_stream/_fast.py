"""Fast mode: the same `ChatCompletionChunk` and `ChatCompletion` objects, built by validation.

The openai SDK builds every response object with `construct_type`, a Python-level walk over the
model's fields that costs tens of microseconds per streamed chunk, and it splits the SSE stream with
a Python line decoder. Fast mode swaps both on a subclass of the client's class (so `with_options`
copies keep it): events are split on blank lines and their JSON decoded by msgspec, and chat objects
are built by pydantic-core's strict validation. Anything strict validation refuses (a new field type,
a provider's own enum value) goes through the SDK's own construction instead, so fast mode never
rejects what the SDK would accept, and both paths give equal `model_dump()`s.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import openai
import pydantic
from openai._streaming import ServerSentEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk

_VALIDATED: frozenset[type[pydantic.BaseModel]] = frozenset({ChatCompletionChunk, ChatCompletion})
_decode = msgspec.json.Decoder().decode


class _Event(ServerSentEvent):
    """An SSE event whose `json()` uses msgspec, falling back to `json.loads` for what msgspec
    refuses (NaN, out-of-range integers), so errors and results match the SDK's."""

    def __init__(self, data: str, event: str | None = None, id: str | None = None, retry: int | None = None) -> None:
        self._data = data
        self._event = event or None
        self._id = id
        self._retry = retry

    def json(self) -> Any:
        try:
            return _decode(self._data)
        except msgspec.DecodeError:
            return json.loads(self._data)


class FastSSEDecoder:
    """The SDK decoder's semantics (CR, LF and CRLF line ends, comments, `id` kept across events,
    an unterminated last event dropped), with lines split by `bytes.split` instead of one at a time."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._retry: int | None = None
        self._last_id: str | None = None
        self._failed: UnicodeDecodeError | None = None
        """A line that is not UTF-8: raised once the events before it have been yielded, as the
        SDK's decoder, which decodes line by line, does."""

    def iter_bytes(self, iterator: Iterator[bytes]) -> Iterator[ServerSentEvent]:
        pending = b""
        for chunk in iterator:
            events, pending = self._feed(pending + chunk if pending else chunk)
            yield from events
            self._raise_failure()
        yield from self._finish(pending)
        self._raise_failure()

    async def aiter_bytes(self, iterator: AsyncIterator[bytes]) -> AsyncIterator[ServerSentEvent]:
        pending = b""
        async for chunk in iterator:
            events, pending = self._feed(pending + chunk if pending else chunk)
            for event in events:
                yield event
            self._raise_failure()
        for event in self._finish(pending):
            yield event
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _finish(self, pending: bytes) -> list[ServerSentEvent]:
        # A CR held back at the very end was a line end after all; any other unfinished line
        # cannot complete an event (only a blank line dispatches one).
        return self._feed(pending[:-1] + b"\n")[0] if pending.endswith(b"\r") else []

    def _feed(self, data: bytes) -> tuple[list[ServerSentEvent], bytes]:
        """Events completed by `data`, and the bytes of its unfinished last line."""
        held = b""
        if b"\r" in data:
            if data.endswith(b"\r"):  # maybe the first half of a CRLF: decide with the next chunk
                data, held = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.rfind(b"\n")
        if end < 0:
            return [], data + held
        events: list[ServerSentEvent] = []
        for line in data[:end].split(b"\n"):
            if line:
                try:
                    self._field(line)
                except UnicodeDecodeError:
                    try:
                        line.decode("utf-8")  # the whole line, as the SDK decodes it: the same error
                    except UnicodeDecodeError as exc:
                        self._failed = exc
                    return events, b""
            elif self._data or self._event or self._last_id or self._retry is not None:
                events.append(_Event("\n".join(self._data), self._event, self._last_id, self._retry))
                self._data, self._event, self._retry = [], None, None
        return events, data[end + 1 :] + held

    def _field(self, raw: bytes) -> None:
        if raw.startswith(b"data: "):
            self._data.append(raw[6:].decode())
            return
        line = raw.decode()
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name == "retry":
            with contextlib.suppress(ValueError):
                self._retry = int(value)


def _make_sse_decoder(self: object) -> FastSSEDecoder:
    return FastSSEDecoder()


_classes: dict[type[openai.AsyncOpenAI], type[openai.AsyncOpenAI]] = {}


def fast_client_class(cls: type[openai.AsyncOpenAI]) -> type[openai.AsyncOpenAI]:
    """A subclass of `cls` in fast mode; its instances are still `cls` instances.

    A single base and no slots of its own keep the layout of `cls`, so an existing client's
    `__class__` can be switched to it.
    """
    known = _classes.get(cls)
    if known is not None:
        return known
    construct = cls._process_response_data

    def _process_response_data(self: Any, *, data: object, cast_to: Any, response: Any) -> Any:
        if cast_to in _VALIDATED and type(data) is dict:
            try:
                return cast_to.model_validate(data, strict=True)
            except pydantic.ValidationError:
                pass  # something the strict schema does not cover: the SDK's construction keeps it
        return construct(self, data=data, cast_to=cast_to, response=response)

    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__slots__": (),
        "_make_sse_decoder": _make_sse_decoder,
        "_process_response_data": _process_response_data,
    }
    fast = _classes[cls] = type(cls.__name__, (cls,), namespace)
    return fast
