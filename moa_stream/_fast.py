"""Fast mode: the same response objects (chat completions and chunks, Responses and their stream
events), built by validation.

The openai SDK builds every response object with `construct_type`, a Python-level walk over the
model's fields that costs tens of microseconds per streamed chunk, and it splits the SSE stream with
a Python line decoder. Fast mode replaces both (`_sdk` installs them on a subclass of the client's
class, so `with_options` copies keep it): events come from the package's SSE framer with their JSON
decoded by msgspec, and response objects are built by pydantic-core's strict validation (a stream
event's class picked by its `type`, as the SDK's discriminator does). Anything strict
validation refuses (a new field type, a provider's own enum value) goes through the SDK's own
construction instead, so fast mode never rejects what the SDK would accept, and both paths give equal
`model_dump()`s.
"""

from __future__ import annotations

import contextlib
import json
import typing
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pydantic
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from ._sse import SSEFramer

_VALIDATED: frozenset[type[pydantic.BaseModel]] = frozenset({ChatCompletionChunk, ChatCompletion, Response})
_decode = msgspec.json.Decoder().decode


def variants_by_tag(union: Any) -> dict[str, type[pydantic.BaseModel]]:
    """The classes of an SDK discriminated union (`Annotated[Union[...], PropertyInfo(discriminator=...)]`)
    by their discriminator value; a value that two classes claim is left out (the SDK decides it)."""
    members, *meta = typing.get_args(union)
    field = next(m.discriminator for m in meta if getattr(m, "discriminator", None))
    found: dict[str, list[type[pydantic.BaseModel]]] = {}
    for cls in typing.get_args(members):
        for tag in typing.get_args(cls.model_fields[field].annotation):
            found.setdefault(tag, []).append(cls)
    return {tag: classes[0] for tag, classes in found.items() if len(classes) == 1}


_STREAM_EVENTS = variants_by_tag(ResponseStreamEvent)


def validate_response(data: object, cast_to: Any) -> object | None:
    """`data` as a `cast_to` built by strict validation, or None where the SDK must build it."""
    if type(data) is not dict:
        return None
    model: type[pydantic.BaseModel] | None
    # Identity first: hashing an `Annotated` union (as `in` would) walks all its members each time.
    if cast_to is ResponseStreamEvent:
        tag = data.get("type")
        model = _STREAM_EVENTS.get(tag) if type(tag) is str else None
    else:
        model = cast_to if isinstance(cast_to, type) and cast_to in _VALIDATED else None
    if model is None:
        return None
    try:
        validated: object = model.model_validate(data, strict=True)
    except pydantic.ValidationError:
        return None  # something the strict schema does not cover: the SDK's construction keeps it
    return validated


class Event:
    """What the SDK reads of a server-sent event (`data`, `event`, `id`, `retry`, `json()`), with
    `json()` by msgspec, falling back to `json.loads` for what msgspec refuses (NaN, out-of-range
    integers), so errors and results match the SDK's."""

    __slots__ = ("data", "event", "id", "retry")

    def __init__(self, data: str, event: str | None = None, id: str | None = None, retry: int | None = None) -> None:
        self.data = data
        self.event = event or None
        self.id = id
        self.retry = retry

    def json(self) -> Any:
        try:
            return _decode(self.data)
        except msgspec.DecodeError:
            return json.loads(self.data)


class FastSSEDecoder:
    """The SDK decoder's semantics (CR, LF and CRLF line ends, comments, `id` kept across events,
    an unterminated last event dropped, a line that is not UTF-8 raised after the events before it)
    over the framer's whole events instead of one line at a time."""

    def __init__(self) -> None:
        self._framer = SSEFramer()
        self._data: list[str] = []
        self._event: str | None = None
        self._retry: int | None = None
        self._last_id: str | None = None
        self._failed: UnicodeDecodeError | None = None

    def iter_bytes(self, iterator: Iterator[bytes]) -> Iterator[Event]:
        for chunk in iterator:
            yield from self._feed(chunk)
            self._raise_failure()

    async def aiter_bytes(self, iterator: AsyncIterator[bytes]) -> AsyncIterator[Event]:
        async for chunk in iterator:
            for event in self._feed(chunk):
                yield event
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _feed(self, data: bytes) -> list[Event]:
        """The events that `data` completes (an event is dispatched on its empty line only)."""
        events: list[Event] = []
        if self._failed is not None:
            return events
        framer = self._framer
        blocks = framer.feed(data)[1]
        for block in blocks[1:] if framer.skipped_lf else blocks:
            for line in block.splitlines():
                if line:
                    try:
                        self._field(line)
                    except UnicodeDecodeError:
                        try:
                            line.decode("utf-8")  # the whole line, as the SDK decodes it: the same error
                        except UnicodeDecodeError as exc:
                            self._failed = exc
                        return events
                elif self._data or self._event or self._last_id or self._retry is not None:
                    events.append(Event("\n".join(self._data), self._event, self._last_id, self._retry))
                    self._data, self._event, self._retry = [], None, None
        return events

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
