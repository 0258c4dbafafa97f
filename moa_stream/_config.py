"""`moa.toml`: read once into one typed `Config` (the presets and the budget), validated as it is read.

Top-level tables are `[presets.<name>]` (slots as model names or inline tables with Slot's fields,
except `client`; `self_moa` as an inline table with SelfMoA's fields) and `[budget.*]`. Every
problem raises `ConfigError` naming the file.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from ._budget import Budget, budget_from_toml
from ._checks import Where, check_table_keys, show, unknown_key
from ._errors import ConfigError
from ._presets import _PRESET_TYPES, _SELF_MOA_TYPES, _SLOT_TYPES, Preset, SelfMoA, Slot, check_name, validate_presets
from ._store import StoreConfig, store_from_toml


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """What a moa.toml holds, validated."""

    source: str
    """The file's path, as errors name it."""
    presets: dict[str, Preset]
    """Normalized presets by name (see `validate_presets`)."""
    budget: Budget | None = None
    """The `[budget]` tables, when there are any."""
    store: StoreConfig | None = None
    """The `[store]` table, when there is one."""


def read_config(path: str | os.PathLike[str]) -> Config:
    """Read a moa.toml once: its presets and its budget, validated."""
    source, document = _read_toml(path)
    presets = validate_presets(_presets_from_toml(source, document), source=source)
    table = document.get("budget")
    store = document.get("store")
    return Config(
        source=source,
        presets=presets,
        budget=None if table is None else budget_from_toml(source, table),
        store=None if store is None else store_from_toml(source, store),
    )


def load_config(path: str | os.PathLike[str]) -> dict[str, Preset]:
    """The presets of a moa.toml (`[presets.<name>]` tables), validated and normalized.

    Slots are model names or inline tables with Slot's fields (except `client`); `self_moa` is an
    inline table with SelfMoA's fields. Every problem raises `ConfigError` naming the file.
    """
    return read_config(path).presets


def load_budget(path: str | os.PathLike[str]) -> Budget | None:
    """The `[budget]` table of a moa.toml, validated; None when it has none."""
    return read_config(path).budget


def read_toml(path: str | os.PathLike[str], *, what: str, top_level: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """A TOML file (`what` names it in errors) whose top-level keys are among `top_level`; its
    source as errors name it, and its document. `ConfigError` names the file and the problem."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read {what}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    for key in document:
        if key not in top_level:
            raise ConfigError(f"{source}: top-level key {key!r}: {unknown_key(key, top_level)}")
    return source, document


def _read_toml(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    return read_toml(path, what="config file", top_level=_TOP_LEVEL)


_TOP_LEVEL = ("presets", "budget", "store")


def _presets_from_toml(source: str, document: dict[str, Any]) -> dict[str, Preset]:
    tables = document.get("presets", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: 'presets' must be a table of [presets.<name>] tables, got {show(tables)}")
    presets: dict[str, Preset] = {}
    for name, table in tables.items():
        scope = Where(source, check_name(source, name))
        if not isinstance(table, dict):
            raise scope.error(None, f"expected a [presets.{name}] table, got {show(table)}")
        presets[name] = _preset_from_table(scope, table)
    return presets


def _preset_from_table(scope: Where, table: dict[str, Any]) -> Preset:
    # Only the shape is converted here (tables to Structs); types and values are checked by
    # validate_presets, the same way as for presets given in Python.
    fields: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _PRESET_TYPES:
            raise scope.error(key, unknown_key(key, _PRESET_TYPES))
        if key == "references" and isinstance(value, list):
            value = [_slot_from_toml(scope, f"references[{i}]", item) for i, item in enumerate(value)]
        elif key == "layers" and isinstance(value, list):
            value = [
                [_slot_from_toml(scope, f"layers[{i}][{j}]", item) for j, item in enumerate(layer)]
                if isinstance(layer, list)
                else layer
                for i, layer in enumerate(value)
            ]
        elif key == "aggregator":
            value = _slot_from_toml(scope, "aggregator", value)
        elif key == "self_moa" and isinstance(value, dict):
            check_table_keys(scope, "self_moa", value, _SELF_MOA_TYPES, required=("model", "n"))
            value = SelfMoA(**value)
        fields[key] = value
    return Preset(**fields)


def _slot_from_toml(scope: Where, field: str, value: object) -> object:
    if not isinstance(value, dict):
        return value
    if "client" in value:
        raise scope.error(
            f"{field}.client", "a client object can only be given in Python; use base_url and api_key_env"
        )
    check_table_keys(scope, field, value, _SLOT_TYPES, required=("model",))
    return Slot(**value)
