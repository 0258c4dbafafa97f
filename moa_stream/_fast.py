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

On the way out, `ParamsTransform` stands in for the SDK's params transform (`async_maybe_transform`)
on the fast client's own resources: where the params type can neither rename nor reformat anything
and the data is plain JSON, the transform's result is the data minus its not-given values, which a
plain copy gives for a fraction of the cost; everything else goes to the SDK's transform.
"""

from __future__ import annotations

import contextlib
import json
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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


# -- the params transform ---------------------------------------------------------------------------

_MAX_DEPTH = 64
"""Deeper data (or a container that holds itself) goes to the SDK's transform."""
_MAX_TYPES = 512
"""Verdicts kept; params types are module-level SDK classes, so this is never reached in practice."""
_UNIONS = (typing.Union, types.UnionType)
_REFUSED: Any = object()


class _NotJSON(Exception):
    """Raised by `_json_copy` at the first value that is not plain JSON."""


def _json_copy(value: object, depth: int) -> object:
    """A copy of plain JSON data (dicts with str keys, lists, str, int, float, bool, None; exact types,
    so subclasses such as enums or `PydanticFunctionTool` go to the SDK), else `_NotJSON`."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if depth >= _MAX_DEPTH:
        raise _NotJSON
    if type(value) is dict:
        copied: dict[str, object] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _NotJSON
            copied[key] = _json_copy(item, depth + 1)
        return copied
    if type(value) is list:
        return [_json_copy(item, depth + 1) for item in value]
    raise _NotJSON


class ParamsTransform:
    """The SDK's params transforms (`maybe_transform` and `async_maybe_transform`), short-cut where
    their result is provably the same.

    The SDK's transform renames keys (`PropertyInfo(alias=...)`), formats dates and files
    (`PropertyInfo(format=...)`), dumps pydantic models, turns other iterables into lists and drops
    not-given values from every mapping it matches to a TypedDict. For a params type that reaches no
    alias or format (checked once per type, recursively) and a dict of plain JSON whose not-given
    values are all at the top, its result is that dict without them: that is what this returns, as a
    copy. Any other data or type goes to the SDK's transform unchanged.

    `inert(metadata)` says whether an `Annotated` metadata object leaves data alone, `is_typeddict`
    is the SDK's own test and `not_given` the classes of its not-given markers: all of them come from
    `_sdk`, the one module that reads the SDK's private parts.
    """

    def __init__(
        self,
        sdk: Callable[[object, object], Any],
        sdk_async: Callable[[object, object], Awaitable[Any]],
        *,
        inert: Callable[[object], bool],
        is_typeddict: Callable[[Any], bool],
        not_given: tuple[type, ...],
    ) -> None:
        self.sdk = sdk
        self.sdk_async = sdk_async
        self._inert = inert
        self._is_typeddict = is_typeddict
        self._not_given = not_given
        # By id, with the type kept alive beside its verdict: hashing an `Annotated` union walks it.
        self._verdicts: dict[int, tuple[object, bool]] = {}

    def maybe_transform(self, data: object, expected_type: object) -> Any:
        """What the SDK's `maybe_transform(data, expected_type)` returns."""
        copied = self._copy(data, expected_type)
        return self.sdk(data, expected_type) if copied is _REFUSED else copied

    async def async_maybe_transform(self, data: object, expected_type: object) -> Any:
        """What the SDK's `async_maybe_transform(data, expected_type)` returns."""
        copied = self._copy(data, expected_type)
        return await self.sdk_async(data, expected_type) if copied is _REFUSED else copied

    def _copy(self, data: object, expected_type: object) -> object:
        """The transform's result, or `_REFUSED` where only the SDK can tell."""
        if data is None:
            return None
        if type(data) is not dict or not self.skips(expected_type):
            return _REFUSED
        not_given = self._not_given
        copied: dict[str, object] = {}
        try:
            for key, value in data.items():
                if isinstance(value, not_given):
                    continue
                if type(key) is not str:
                    return _REFUSED
                copied[key] = _json_copy(value, 1)
        except _NotJSON:
            return _REFUSED
        return copied

    def skips(self, expected_type: object) -> bool:
        """Whether plain JSON data of `expected_type` may skip the SDK's transform (cached)."""
        known = self._verdicts.get(id(expected_type))
        if known is not None and known[0] is expected_type:
            return known[1]
        verdict = self._judge(expected_type)
        if len(self._verdicts) >= _MAX_TYPES:
            self._verdicts.clear()
        self._verdicts[id(expected_type)] = (expected_type, verdict)
        return verdict

    def _judge(self, expected_type: object) -> bool:
        # The SDK drops top-level not-given values only where it matches the data to a TypedDict.
        if typing.get_origin(expected_type) in _UNIONS:
            tops: tuple[object, ...] = typing.get_args(expected_type)
        else:
            tops = (expected_type,)
        if not all(self._is_typeddict(top) for top in tops):
            return False
        try:
            return self._plain(expected_type, set())
        except Exception:  # an annotation that cannot be resolved: the SDK's transform decides
            return False

    def _plain(self, annotation: object, seen: set[int]) -> bool:
        """Whether nothing reachable from `annotation` renames or reformats data."""
        if self._is_typeddict(annotation):
            if id(annotation) in seen:
                return True  # a recursive type: its fields are being checked further up
            seen.add(id(annotation))
            hints = typing.get_type_hints(annotation, include_extras=True)
            return all(self._plain(hint, seen) for hint in hints.values())
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            base, *metadata = typing.get_args(annotation)
            return all(self._inert(item) for item in metadata) and self._plain(base, seen)
        if origin is typing.Literal:
            return True  # its arguments are values, not types
        if origin is not None:  # unions, containers, Required/NotRequired
            return all(self._plain(arg, seen) for arg in typing.get_args(annotation))
        # A class is a leaf to the transform; a forward reference, TypeVar or alias we do not know is refused.
        return annotation is None or annotation is typing.Any or isinstance(annotation, type)
