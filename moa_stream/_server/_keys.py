"""The keys of `moa-stream serve --keys FILE`: who may call, under which key id, with which key-level budget.

The file is TOML and holds digests, never tokens:

    [keys.alice]
    sha256 = "<the 64 hex digits of the sha256 of alice's token>"
    [keys.alice.budget]   # optional: limits over all of alice's sessions together
    calls = 100
    cost_usd = 5.0

A key id is 1 to 64 of `A-Z a-z 0-9 _ -` (no dot: the server names a key's sessions `<key id>.<session>`).
A budget table has the fields of `moa_stream.Limits`: `cost_usd`, `input_tokens`, `output_tokens`,
`total_tokens`, `calls`. `moa-stream serve --hash-token` prints the `sha256 = ...` line for a token read
from stdin. A bearer token is hashed and its digest compared with every key's in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from .._budget import _LIMIT_NAMES, Limits, _check_limit
from .._checks import Where, check_table_keys, plural, show, unknown_key
from .._config import read_toml
from .._errors import ConfigError

DEFAULT_SESSION = "default"
"""The session of a key's requests that name none (as `<key id>.default`)."""

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_KEY_FIELDS = {"sha256": str, "budget": dict}

logger = logging.getLogger("moa_stream.server")


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a keys file."""

    id: str
    digest: bytes
    """The sha256 digest of its token (32 bytes)."""
    budget: Limits | None
    """Limits over all of the key's sessions; None for none."""


def token_digest(token: str | bytes) -> str:
    """The hex sha256 of a bearer token, as a keys file's `sha256` holds it."""
    return hashlib.sha256(token.encode("utf-8") if isinstance(token, str) else token).hexdigest()


def read_keys(path: str | os.PathLike[str]) -> dict[str, Key]:
    """The keys of a keys file, validated; `ConfigError` names the file, the key and the field."""
    source, document = read_toml(path, what="the keys file", top_level=("keys",))
    tables = document.get("keys")
    if not isinstance(tables, dict):
        got = "nothing" if tables is None else show(tables)
        raise ConfigError(f"{source}: 'keys' must be a table of [keys.<id>] tables, got {got}")
    keys: dict[str, Key] = {}
    owners: dict[bytes, str] = {}
    for key_id, table in tables.items():
        key = _key_from_table(source, key_id, table)
        if key.digest in owners:
            # One token, two ids: which one a request is would depend on the order of the file.
            raise ConfigError(
                f"{source}: key {key_id!r}: field 'sha256': the same digest as key {owners[key.digest]!r}"
            )
        owners[key.digest] = key_id
        keys[key_id] = key
    return keys


def _key_from_table(source: str, key_id: str, table: object) -> Key:
    if not _KEY_ID.fullmatch(key_id):
        raise ConfigError(
            f"{source}: key {key_id!r}: a key id is 1 to 64 of A-Z a-z 0-9 _ - (a dot separates key and session)"
        )
    scope = Where(f"{source}: key {key_id!r}")
    if not isinstance(table, dict):
        raise scope.error(None, f"expected a [keys.{key_id}] table, got {show(table)}")
    for name in table:
        if name not in _KEY_FIELDS:
            raise scope.error(name, unknown_key(name, _KEY_FIELDS))
    digest = table.get("sha256")
    if digest is None:
        raise scope.error("sha256", "missing (moa-stream serve --hash-token prints it)")
    # The value is not shown: a token pasted here by mistake would end up in a log.
    if not isinstance(digest, str):
        raise scope.error("sha256", f"expected a string of 64 hex digits, got a {type(digest).__name__}")
    if not _HEX_DIGEST.fullmatch(digest):
        raise scope.error(
            "sha256",
            f"expected the 64 hex digits of a sha256 digest, got {len(digest)} characters "
            "(moa-stream serve --hash-token prints it)",
        )
    return Key(id=key_id, digest=bytes.fromhex(digest), budget=_budget(scope, table.get("budget")))


def _budget(scope: Where, table: object) -> Limits | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise scope.error("budget", f"expected a table of limits, got {show(table)}")
    check_table_keys(scope, "budget", table, dict.fromkeys(_LIMIT_NAMES), required=())
    fields: dict[str, Any] = {}
    for name, value in table.items():
        _check_limit(scope.source, f"budget.{name}", value, integer=name != "cost_usd")
        fields[name] = float(value) if name == "cost_usd" else value
    limits = Limits(**fields)
    return limits if limits.items() else None


class KeyBudgets(Protocol):
    """Where key-level budgets take effect: the wrapped client's engine."""

    def set_key_limits(self, key_id: str, limits: Limits | None) -> None: ...


class KeyRing:
    """The keys a server accepts, from a keys file (`KeyRing.load`) or one token (`KeyRing.of_token`).

    `reload()` re-reads the file and replaces every key at once, or, when the file has a problem,
    none (the problem is logged). Once `attach`ed to the engine of a wrapped client, every load tells
    it each key's budget, and None for keys that are gone.
    """

    def __init__(self, keys: Mapping[str, Key], *, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._keys = dict(keys)
        self._budgets: KeyBudgets | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        """The keys of the file at `path` (`ConfigError` for a bad one)."""
        return cls(read_keys(path), path=path)

    @classmethod
    def of_token(cls, token: str, *, key_id: str = "default") -> KeyRing:
        """One key, for one bearer token."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        return cls({key_id: Key(id=key_id, digest=digest, budget=None)})

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def match(self, token: bytes) -> str | None:
        """The id of the key whose token this is, or None."""
        digest = hashlib.sha256(token).digest()
        found: str | None = None
        # Every key is compared, whichever matches: the time taken does not tell which one did.
        for key in self._keys.values():
            if hmac.compare_digest(digest, key.digest):
                found = key.id
        return found

    def attach(self, budgets: KeyBudgets) -> None:
        """Give each key's budget to `budgets` now and after every reload (one target per ring)."""
        if self._budgets is not None and self._budgets is not budgets:
            raise ValueError("KeyRing.attach(): this ring already gives its budgets to another client")
        self._budgets = budgets
        self._apply({})

    async def reload(self) -> bool:
        """Re-read the keys file: True once its keys replaced the old ones; False when it has a
        problem (logged as an error), and the old keys stay."""
        if self.path is None:
            raise RuntimeError("KeyRing.reload() needs a ring loaded from a file")
        try:
            keys = await anyio.to_thread.run_sync(read_keys, self.path)
        except ConfigError as exc:
            logger.error("cannot reload the keys: %s; the %s loaded before stay", exc, plural(len(self._keys), "key"))
            return False
        old, self._keys = self._keys, keys
        self._apply(old)
        logger.info("reloaded %s from %s", plural(len(keys), "key"), self.path)
        return True

    def _apply(self, old: Mapping[str, Key]) -> None:
        if self._budgets is None:
            return
        for key_id in old.keys() - self._keys.keys():
            self._budgets.set_key_limits(key_id, None)
        for key in self._keys.values():
            self._budgets.set_key_limits(key.id, key.budget)
