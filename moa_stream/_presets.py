"""Mixture-of-Agents presets: what `model="moa:<name>"` runs, validated once when loaded.

A preset names reference models (one layer or several) and an aggregator. `validate_presets()` checks
presets given in Python (and `_config` those read from a `moa.toml`); it returns normalized copies
(every slot a `Slot` with a unique label, the reference layers in `layers`) and raises `ConfigError`
with a one-line message naming the source, the preset, the field and the bad value. Indexes in field
names count from 0 as in Python and TOML arrays (`layers[1][0]`); layers in prose count from 1.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from ._checks import KeywordOnly, Where, plural, show, typed, unknown_key
from ._errors import ConfigError


class Slot(msgspec.Struct, frozen=True, kw_only=True, metaclass=KeywordOnly):
    """One model call in a preset: a reference or the aggregator, with its own request overrides.

    A bare string stands for `Slot(model=<string>)`. The slot goes to the wrapped client unless it
    names its own `client` (Python only) or its own upstream by `base_url`.
    """

    model: str
    """Upstream model name; never `moa:<preset>` (presets do not nest)."""
    label: str = ""
    """Name of the slot in events and traces, unique within its preset; "" = the model name, repeats
    numbered `#2`, `#3`... by validation."""
    client: Any = None
    """Python only: an `openai.AsyncOpenAI` to use for this slot instead of the wrapped client."""
    base_url: str | None = None
    """An own OpenAI-compatible upstream for this slot (`http://` or `https://`)."""
    api_key_env: str | None = None
    """NAME of the environment variable holding the key for `base_url` (never the key itself); read
    when a call is made. None with a `base_url` = a keyless server."""
    system: str | None = None
    """An extra system instruction for this slot (diversity in Self-MoA)."""
    temperature: float | None = None
    """Sampling temperature for this slot (None = the caller's)."""
    max_tokens: int | None = None
    """Output token limit for this slot (None = the caller's)."""
    seed: int | None = None
    """Sampling seed for this slot (None = the caller's)."""
    extra: dict[str, Any] = {}
    """Extra request-body parameters for this slot; `model`, `messages` and `stream` are not allowed."""
    api: Literal["chat", "responses"] = "chat"
    """The API a reference slot's upstream is called with: chat completions (every OpenAI-compatible
    server has it), or the Responses API. The aggregator speaks the caller's API: through the Responses
    API when its upstream has it, else bridged to chat completions (learned from a 404 or 405)."""


class SelfMoA(msgspec.Struct, frozen=True, kw_only=True, metaclass=KeywordOnly):
    """Self-MoA shorthand (arXiv:2502.00674): one layer of `n` samples of one model.

    The samples differ by seed (1..n unless `seeds` is given) and optionally by temperature and system
    instruction; their labels are `<model>#1`...`<model>#n`.
    """

    model: str
    """The model to sample."""
    n: int
    """Number of samples (>= 1)."""
    temperatures: list[float] = []
    """One temperature per sample, or empty for the caller's."""
    seeds: list[int] = []
    """One seed per sample, or empty for seeds 1..n (so the samples differ)."""
    systems: list[str] = []
    """One extra system instruction per sample, or empty for none."""


class Preset(msgspec.Struct, frozen=True, kw_only=True, metaclass=KeywordOnly):
    """A Mixture-of-Agents preset: reference layers, an aggregator, and how a turn waits, degrades and caches.

    Give exactly one of `references` (one layer), `layers` (several) or `self_moa`, and an
    `aggregator`. Only a preset returned by `validate_presets()` or `load_config()` is ready for use:
    there `layers` holds every reference slot as a labelled `Slot` and `aggregator` is a `Slot`.
    """

    # Sequence rather than list so that `references=self_moa(...)` (a list[Slot]) type-checks;
    # validation stores lists.
    references: Sequence[Slot | str] = []
    """A single layer of reference slots (a string is `Slot(model=<string>)`)."""
    layers: Sequence[Sequence[Slot | str]] = []
    """Several layers of reference slots; each layer sees the answers of the one before."""
    self_moa: SelfMoA | Sequence[Slot] | None = None
    """The Self-MoA shorthand for one layer of samples of one model: a `SelfMoA`, or the samples
    `moa_stream.self_moa()` makes (the same as giving them as `references`)."""
    aggregator: Slot | str | None = None
    """The model that synthesizes the last layer's answers into the reply the caller sees (required)."""
    quorum: int | None = None
    """References of a layer that must succeed before the next step may start; None = all of them."""
    grace: float = 0.0
    """Seconds to wait for the remaining references once the quorum succeeded (>= 0)."""
    reference_timeout: float = 60.0
    """Deadline of each reference call in seconds (> 0)."""
    on_all_failed: Literal["aggregator_alone", "error"] = "aggregator_alone"
    """When every reference of a layer failed: answer with the aggregator alone, or fail the turn."""
    on_budget_short: Literal["fewer_references", "aggregator_alone", "refuse"] = "fewer_references"
    """When a budget cannot hold a layer's references and the aggregator at their worst case: run
    the references that fit (the most expensive left out first), the aggregator alone, or refuse the
    turn. The choice is in the trace (`budget_short`) and a `BudgetWarning`."""
    aggregator_retries: int = 2
    """Further attempts the turn makes for its aggregator request after a 408/409/429/5xx or a
    dropped or timed-out exchange (not a refused connection), before any byte reaches the caller.
    The turn's own answers are never retried by the caller's SDK, so references never run twice."""
    placement: Literal["system", "user"] = "system"
    """Where the reference block goes: appended to the system message, or as a trailing user message
    (keeps the provider's prefix cache intact)."""
    template: str | None = None
    """Own text of the reference block, a `str.format` string with one placeholder, `{references}`
    (literal braces doubled). None = the built-in text."""
    silent_degradation: bool = False
    """True: do not tell the aggregator that some references are missing."""
    cadence: Literal["per_user_turn", "per_call", "every_n"] = "per_user_turn"
    """When references run in an agent loop: once per user turn, on every call, or every `every_n` calls;
    in between the aggregator gets the cached reference block."""
    cache_repeats: bool = False
    """True: a request identical to a cached user turn (a "regenerate") reuses its references too;
    by default only a call that extends it with tool results does."""
    every_n: int | None = None
    """The interval for cadence `every_n` (>= 1): required with it, refused with any other."""
    usage: Literal["turn", "aggregator"] = "turn"
    """What the caller's final usage chunk reports: the whole turn, or the aggregator call alone."""
    tool_result_chars: int = 2000
    """Tool results in the references' text-only view are truncated to this many characters (>= 100)."""
    cache_entries: int = 256
    """Bound on the cadence cache's entries (>= 1)."""
    cache_ttl_s: float = 3600.0
    """Maximum age of a cadence cache entry in seconds (> 0)."""

    def reference_layers(self) -> list[list[Slot]]:
        """The reference layers as labelled Slots; only on a preset from `validate_presets()`/`load_config()`."""
        layers = [[slot for slot in layer if isinstance(slot, Slot) and slot.label] for layer in self.layers]
        normalized = (
            not self.references
            and self.self_moa is None
            and bool(layers)
            and all(len(ours) == len(theirs) for ours, theirs in zip(layers, self.layers, strict=True))
        )
        if not normalized:
            raise ConfigError(_NOT_VALIDATED)
        return layers

    def aggregator_slot(self) -> Slot:
        """The aggregator as a labelled Slot; only on a preset from `validate_presets()`/`load_config()`."""
        if not (isinstance(self.aggregator, Slot) and self.aggregator.label):
            raise ConfigError(_NOT_VALIDATED)
        return self.aggregator


_NOT_VALIDATED = "preset is not validated: pass it through validate_presets() or load_config() first"
_PRESET_NAME = re.compile(r"[A-Za-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The middleware sets these itself; a slot overriding them would break the turn.
_RESERVED_EXTRA = ("messages", "model", "stream", "input")
_SLOT_LISTS = ("references", "layers", "self_moa")

_SLOT_TYPES: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Slot)}
_SELF_MOA_TYPES: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(SelfMoA)}
_PRESET_TYPES: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Preset)}


# Bad values can be whole templates or objects; keep messages on one readable line.
def check_name(source: str, name: object) -> str:
    if not isinstance(name, str) or not _PRESET_NAME.fullmatch(name):
        raise ConfigError(f"{source}: preset {show(name)}: invalid preset name; use letters, digits, '.', '_' and '-'")
    return name


def _check_model(scope: Where, field: str, model: str) -> None:
    if not model.strip():
        raise scope.error(field, f"empty model name {model!r}")
    if model.lower().startswith("moa:"):
        raise scope.error(field, f"{model!r} names a preset; a preset's slots must be upstream models")


def _check_slot(scope: Where, field: str, value: object) -> Slot:
    if isinstance(value, str):
        value = Slot(model=value)
    elif not isinstance(value, Slot):
        raise scope.error(field, f"expected a model name or a Slot, got {show(value)}")
    changes = {
        name: typed(scope, f"{field}.{name}", getattr(value, name), tp)
        for name, tp in _SLOT_TYPES.items()
        if name != "client"
    }
    slot: Slot = msgspec.structs.replace(value, **changes)
    _check_model(scope, f"{field}.model", slot.model)
    if slot.label and not slot.label.strip():
        raise scope.error(f"{field}.label", f"blank label {slot.label!r}")
    if slot.base_url is not None:
        if slot.client is not None:
            raise scope.error(f"{field}.base_url", f"{slot.base_url!r} is given together with client; give one")
        if not slot.base_url.startswith(("http://", "https://")):
            raise scope.error(f"{field}.base_url", f"{show(slot.base_url)} is not an http:// or https:// URL")
    if slot.api_key_env is not None:
        if not _ENV_NAME.fullmatch(slot.api_key_env):
            # It may be the key itself, so it stays out of the message (and out of logs).
            raise scope.error(
                f"{field}.api_key_env",
                "must be the NAME of an environment variable (letters, digits, '_'), not the key; value not shown",
            )
        if slot.base_url is None:
            raise scope.error(
                f"{field}.api_key_env",
                f"{slot.api_key_env!r} is given without base_url; the key is for an own upstream",
            )
    if slot.temperature is not None and not slot.temperature >= 0:
        raise scope.error(f"{field}.temperature", f"must be >= 0, got {slot.temperature!r}")
    if slot.max_tokens is not None and slot.max_tokens < 1:
        raise scope.error(f"{field}.max_tokens", f"must be >= 1, got {slot.max_tokens!r}")
    for key in _RESERVED_EXTRA:
        if key in slot.extra:
            raise scope.error(f"{field}.extra", f"key {key!r} is set by moa_stream and cannot be overridden")
    return slot


def _slot_list(scope: Where, field: str, value: object) -> list[Slot]:
    if not isinstance(value, list | tuple):
        raise scope.error(field, f"expected a list of model names or Slots, got {show(value)}")
    return [_check_slot(scope, f"{field}[{i}]", item) for i, item in enumerate(value)]


def _is_given(value: object) -> bool:
    return value is not None and not (isinstance(value, list | tuple) and len(value) == 0)


def _check_self_moa(scope: Where, value: object) -> list[Slot]:
    if isinstance(value, list | tuple) and value and all(isinstance(slot, Slot) for slot in value):
        return _slot_list(scope, "self_moa", value)  # what `self_moa()` returns: its samples as slots
    if not isinstance(value, SelfMoA):
        raise scope.error("self_moa", f"expected a SelfMoA (a table with model and n), got {show(value)}")
    fields = {name: typed(scope, f"self_moa.{name}", getattr(value, name), tp) for name, tp in _SELF_MOA_TYPES.items()}
    _check_model(scope, "self_moa.model", fields["model"])
    n: int = fields["n"]
    if n < 1:
        raise scope.error("self_moa.n", f"must be >= 1, got {n!r}")
    for name in ("temperatures", "seeds", "systems"):
        if fields[name] and len(fields[name]) != n:
            raise scope.error(f"self_moa.{name}", f"has {plural(len(fields[name]), 'value')} but n is {n}")
    slots = self_moa(
        fields["model"], n, temperatures=fields["temperatures"], seeds=fields["seeds"], systems=fields["systems"]
    )
    return [_check_slot(scope, f"self_moa[{i}]", slot) for i, slot in enumerate(slots)]


def _reference_layers(scope: Where, preset: Preset) -> list[list[tuple[str, Slot]]]:
    """The reference slots by layer, each with the field name that errors about it use."""
    given = [name for name in _SLOT_LISTS if _is_given(getattr(preset, name))]
    if len(given) > 1:
        raise scope.error(
            given[1], f"cannot be combined with {given[0]!r}; give exactly one of 'references', 'layers' or 'self_moa'"
        )
    if not given:
        raise scope.error("references", "is empty; give reference models in 'references', 'layers' or 'self_moa'")
    if given[0] == "references":
        slots = _slot_list(scope, "references", preset.references)
        return [[(f"references[{i}]", slot) for i, slot in enumerate(slots)]]
    if given[0] == "self_moa":
        slots = _check_self_moa(scope, preset.self_moa)
        return [[(f"self_moa[{i}]", slot) for i, slot in enumerate(slots)]]
    if not isinstance(preset.layers, list | tuple):
        raise scope.error(
            "layers", f"expected a list of layers (lists of model names or Slots), got {show(preset.layers)}"
        )
    layers: list[list[tuple[str, Slot]]] = []
    for i, layer in enumerate(preset.layers):
        field = f"layers[{i}]"
        if not isinstance(layer, list | tuple):
            raise scope.error(
                field,
                f"expected a layer (a list of model names or Slots), got {show(layer)}; one layer goes in references",
            )
        if not layer:
            raise scope.error(field, "empty layer; every layer needs at least one reference model")
        layers.append([(f"{field}[{j}]", _check_slot(scope, f"{field}[{j}]", item)) for j, item in enumerate(layer)])
    return layers


def _label_slots(scope: Where, slots: list[tuple[str, Slot]]) -> list[Slot]:
    """Fill in empty labels (model, model#2, ...) around the explicit ones, which must be unique."""
    owner: dict[str, str] = {}
    for field, slot in slots:
        if slot.label in owner:
            raise scope.error(
                f"{field}.label", f"duplicate label {slot.label!r} (also the label of {owner[slot.label]})"
            )
        if slot.label:
            owner[slot.label] = field
    seen: dict[str, int] = {}
    labelled: list[Slot] = []
    for _, slot in slots:
        if not slot.label:
            count = seen.get(slot.model, 0)
            while True:
                count += 1
                label = slot.model if count == 1 else f"{slot.model}#{count}"
                if label not in owner:
                    break
            seen[slot.model] = count
            owner[label] = slot.model
            slot = msgspec.structs.replace(slot, label=label)
        labelled.append(slot)
    return labelled


def _check_scalars(scope: Where, preset: Preset, layers: list[list[tuple[str, Slot]]]) -> dict[str, Any]:
    values = {
        name: typed(scope, name, getattr(preset, name), tp)
        for name, tp in _PRESET_TYPES.items()
        if name not in (*_SLOT_LISTS, "aggregator")
    }
    quorum: int | None = values["quorum"]
    if quorum is not None:
        if quorum < 1:
            raise scope.error("quorum", f"{quorum} is less than 1; None waits for every reference")
        for i, layer in enumerate(layers, start=1):
            if quorum > len(layer):
                raise scope.error(
                    "quorum", f"{quorum} is larger than the {plural(len(layer), 'reference')} of layer {i}"
                )
    # `not x >= 0` rather than `x < 0` so that NaN is refused too.
    if not values["grace"] >= 0:
        raise scope.error("grace", f"must be >= 0, got {values['grace']!r}")
    for name in ("reference_timeout", "cache_ttl_s"):
        if not values[name] > 0:
            raise scope.error(name, f"must be > 0, got {values[name]!r}")
    if values["cadence"] == "every_n" and values["every_n"] is None:
        raise scope.error("every_n", "is required with cadence 'every_n' (the calls between reruns)")
    if values["cadence"] != "every_n" and values["every_n"] is not None:
        raise scope.error("every_n", f"is only used with cadence 'every_n', not {values['cadence']!r}")
    for name, least in (("every_n", 1), ("tool_result_chars", 100), ("cache_entries", 1), ("aggregator_retries", 0)):
        if values[name] is not None and values[name] < least:
            raise scope.error(name, f"must be >= {least}, got {values[name]!r}")
    if values["template"] is not None:
        _check_template(scope, values["template"])
    return values


def _check_template(scope: Where, template: str) -> None:
    # The reference block is rendered with str.format, so any other brace would fail mid-turn; it
    # is caught here instead.
    braces = "write literal braces as '{{' and '}}'"
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        if "references" not in names:
            raise scope.error("template", f"{show(template)} has no '{{references}}' placeholder")
        others = sorted(names - {"references"})
        if others:
            raise scope.error("template", f"{show(template)} has placeholder {{{others[0]}}}; {braces}")
        template.format(references="")
    except (ValueError, IndexError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise scope.error("template", f"{show(template)} is not a valid format string ({exc}); {braces}") from None


def _check_preset(scope: Where, preset: object) -> Preset:
    if not isinstance(preset, Preset):
        raise scope.error(None, f"expected a Preset, got {show(preset)}")
    layers = _reference_layers(scope, preset)
    if preset.aggregator is None:
        raise scope.error("aggregator", "missing; every preset needs an aggregator model")
    aggregator = ("aggregator", _check_slot(scope, "aggregator", preset.aggregator))
    values = _check_scalars(scope, preset, layers)
    # The aggregator is labelled last so that references keep the plain model names.
    labelled = _label_slots(scope, [*(entry for layer in layers for entry in layer), aggregator])
    normalized: list[list[Slot | str]] = []
    for layer in layers:
        normalized.append(list(labelled[: len(layer)]))
        labelled = labelled[len(layer) :]
    return msgspec.structs.replace(
        preset, references=[], layers=normalized, self_moa=None, aggregator=labelled[0], **values
    )


def self_moa(
    model: str,
    n: int,
    *,
    temperatures: Sequence[float] = (),
    seeds: Sequence[int] = (),
    systems: Sequence[str] = (),
    **slot_fields: Any,
) -> list[Slot]:
    """Self-MoA (arXiv:2502.00674) shorthand: n slots of one model that differ by seed/temperature/system.

    Labels are `<model>#1`...`<model>#n` (`<label>#i` when `label=` is given); seeds default to 1..n.
    Other keyword arguments are Slot fields shared by every sample, e.g. `base_url` or `temperature`.
    """
    scope = Where("self_moa()")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise scope.error("n", f"must be an integer >= 1, got {show(n)}")
    per_sample: dict[str, list[Any]] = {"temperature": list(temperatures), "seed": list(seeds), "system": list(systems)}
    for single, values in per_sample.items():
        if values and len(values) != n:
            raise scope.error(f"{single}s", f"has {plural(len(values), 'value')} but n is {n}")
        if values and single in slot_fields:
            raise scope.error(single, f"is given together with {single}s; give one")
    for key in slot_fields:
        if key not in _SLOT_TYPES or key == "model":
            raise scope.error(key, unknown_key(key, set(_SLOT_TYPES) - {"model"}))
    base = slot_fields.pop("label", "") or model
    if not per_sample["seed"] and "seed" not in slot_fields:
        per_sample["seed"] = list(range(1, n + 1))
    return [
        Slot(
            model=model,
            label=f"{base}#{i + 1}",
            **slot_fields,
            **{name: values[i] for name, values in per_sample.items() if values},
        )
        for i in range(n)
    ]


def validate_presets(presets: Mapping[str, Preset], *, source: str = "presets=") -> dict[str, Preset]:
    """Validate every preset and return normalized copies.

    In the copies `layers` holds the reference layers (from `references`, `layers` or `self_moa`),
    `references` and `self_moa` are empty, every slot is a `Slot` with a label unique within its preset,
    and the aggregator is a `Slot`. The first problem found raises `ConfigError` naming `source`.
    """
    if not isinstance(presets, Mapping):
        raise ConfigError(f"{source}: expected a mapping of preset names to Presets, got {show(presets)}")
    return {check_name(source, name): _check_preset(Where(source, name), preset) for name, preset in presets.items()}


def check_key_variables(presets: Mapping[str, Preset], *, source: str) -> None:
    """Refuse validated presets whose slots name an `api_key_env` that is not set now, so that a
    missing key is found when the client is wrapped, not by the first call (`ConfigError`)."""
    for name, preset in presets.items():
        for slot in [*(slot for layer in preset.reference_layers() for slot in layer), preset.aggregator_slot()]:
            if slot.api_key_env is not None and slot.api_key_env not in os.environ:
                raise ConfigError(
                    f"{source}: preset {name!r}: slot {slot.label!r}: api_key_env: "
                    f"environment variable {slot.api_key_env} is not set (it holds the key for {slot.base_url})"
                )
