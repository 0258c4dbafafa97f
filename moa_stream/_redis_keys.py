"""The Redis store's layout: every key under one prefix, and the values in them, versioned.

Keys: `<prefix>:format` (the layout's number); per session `<prefix>:s:<id>:` + `ledger`, `holds`,
`leases`, `settled`, `budget`, `state`; per API key `<prefix>:k:<id>:` + `ledger`, `holds`,
`leases`; `<prefix>:c:<preset>:<sha256>` for the reference cache; `<prefix>:quirks`; `<prefix>:bg:<response id>`
(and `:done`) for background responses held by a process. Values are
JSON with a `v` field; ledgers are hashes of totals (see `_redis_lua`). No key holds credentials.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec

from ._budget import Budget, LimitName
from ._errors import ConfigError
from ._redis_lua import TOTALS
from ._sidecar import SessionLedger
from ._totals import Totals

FORMAT = 1
"""The layout of the keys and values; a store written in another one is refused, not misread."""

_value_decoder = msgspec.json.Decoder(dict[str, Any])


class Keys:
    """Every key the store writes, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def version(self) -> str:
        return f"{self.p}:format"

    def scope(self, kind: str, scope_id: str) -> list[str]:
        base = f"{self.p}:{'s' if kind == 'session' else 'k'}:{scope_id}"
        return [f"{base}:ledger", f"{base}:holds", f"{base}:leases"]

    def session(self, session_id: str, what: str) -> str:
        return f"{self.p}:s:{session_id}:{what}"

    def cache(self, preset: str, key: str) -> str:
        return f"{self.p}:c:{preset}:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"

    def background(self, response_id: str, *, done: bool = False) -> str:
        return f"{self.p}:bg:{response_id}{':done' if done else ''}"

    def quirks(self) -> str:
        return f"{self.p}:quirks"


def decode_value(raw: bytes | str, key: str) -> dict[str, Any]:
    doc = _value_decoder.decode(raw)
    if doc.get("v") != FORMAT:
        raise ConfigError(f"the value under {key!r} is in format {doc.get('v')!r}; this moa_stream reads {FORMAT}")
    return doc


def decode_budget(raw: bytes | str, key: str) -> Budget:
    return msgspec.convert(decode_value(raw, key)["budget"], Budget)


def limit_name(raw: bytes) -> LimitName:
    name = raw.decode()
    assert name in ("cost_usd", "input_tokens", "output_tokens", "total_tokens", "calls")
    return name  # type: ignore[return-value]


def _number(raw: bytes | None, name: str) -> int | float:
    if raw is None:
        return 0.0 if name == "cost_usd" else 0
    return float(raw) if name == "cost_usd" else int(raw)


def totals_of(values: Sequence[bytes | None]) -> Totals:
    fields: dict[str, Any] = {name: _number(raw, name) for name, raw in zip(TOTALS, values, strict=True)}
    return Totals(**fields)


def ledger_of(session_id: str, fields: dict[bytes, bytes]) -> SessionLedger:
    totals: dict[str, Any] = {}
    by: dict[str, dict[str, dict[str, Any]]] = {"m": {}, "r": {}}
    for raw_name, raw in fields.items():
        name = raw_name.decode()
        parts = name.split("\x1f")
        if len(parts) == 3 and parts[0] in by and parts[2] in TOTALS:
            by[parts[0]].setdefault(parts[1], {})[parts[2]] = _number(raw, parts[2])
        elif name in TOTALS or name == "turns":
            totals[name] = _number(raw, name)
    return SessionLedger(
        session_id=session_id,
        turns=int(totals.pop("turns", 0)),
        totals=Totals(**totals),
        by_model={model: Totals(**values) for model, values in by["m"].items()},
        by_role={role: Totals(**values) for role, values in by["r"].items()},
    )
