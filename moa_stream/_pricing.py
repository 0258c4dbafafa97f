"""Prices in the LiteLLM price-table format (USD per token) and the cost of one call."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec


class ModelPrice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """A model's price in USD per token, with LiteLLM's field names."""

    input_cost_per_token: float
    output_cost_per_token: float
    cache_read_input_token_cost: float | None = None
    """Price of a cached prompt token; cached tokens are not priced again as input."""
    cache_creation_input_token_cost: float | None = None
    output_cost_per_reasoning_token: float | None = None
    """Price of a reasoning token, when it differs from the output price."""


PriceInput = ModelPrice | Mapping[str, Any]

# Dated snapshots (`gpt-4.1-mini-2025-04-14`) cost what their base model costs.
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


class PriceTable:
    """Model name to price; lookups tolerate provider prefixes and dated snapshot names."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self._prices: dict[str, ModelPrice] = dict(prices or {})

    @classmethod
    def builtin(cls) -> PriceTable:
        """The small table shipped with moa_stream (`moa_stream/prices.json`)."""
        data = resources.files("moa_stream").joinpath("prices.json").read_bytes()
        return cls(_parse_table(data, origin="moa_stream/prices.json"))

    @classmethod
    def from_litellm_file(cls, path: str | os.PathLike[str]) -> PriceTable:
        """Load a LiteLLM price file (`model_prices_and_context_window.json` or a subset of it).

        Entries without per-token input and output prices (images, audio, embeddings...) are skipped.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read price file {str(path)!r}: {exc.strerror}") from exc
        return cls(_parse_table(data, origin=str(path)))

    def updated(self, prices: Mapping[str, PriceInput]) -> PriceTable:
        """A new table with `prices` added or replacing existing entries."""
        merged = dict(self._prices)
        for model, price in prices.items():
            merged[model] = _price(model, price, origin="prices=")
        return PriceTable(merged)

    def merged(self, other: PriceTable) -> PriceTable:
        return PriceTable({**self._prices, **other._prices})

    def __len__(self) -> int:
        return len(self._prices)

    def lookup(self, model: str) -> ModelPrice | None:
        for name in _candidates(model):
            price = self._prices.get(name)
            if price is not None:
                return price
        return None

    def cost(
        self,
        model: str,
        *,
        input_tokens: int | None,
        output_tokens: int | None,
        cached_input_tokens: int | None = None,
        cache_write_tokens: int | None = None,
        reasoning_tokens: int | None = None,
    ) -> float | None:
        """USD for one call, or None when the price or the token counts are unknown."""
        price = self.lookup(model)
        if price is None or input_tokens is None or output_tokens is None:
            return None
        cached = cached_input_tokens or 0
        written = cache_write_tokens or 0
        uncached = max(input_tokens - cached - written, 0)
        cost = uncached * price.input_cost_per_token
        cost += cached * _or(price.cache_read_input_token_cost, price.input_cost_per_token)
        cost += written * _or(price.cache_creation_input_token_cost, price.input_cost_per_token)
        reasoning = min(reasoning_tokens or 0, output_tokens)
        cost += (output_tokens - reasoning) * price.output_cost_per_token
        cost += reasoning * _or(price.output_cost_per_reasoning_token, price.output_cost_per_token)
        return cost


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _candidates(model: str) -> list[str]:
    names = [model]
    lowered = model.lower()
    if "/" in lowered:
        lowered = lowered.rsplit("/", 1)[1]
    names.append(lowered)
    undated = _DATE_SUFFIX.sub("", lowered)
    if undated != lowered:
        names.append(undated)
    return names


def _parse_table(data: bytes, *, origin: str) -> dict[str, ModelPrice]:
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"price file {origin}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"price file {origin}: expected a JSON object of model -> price")
    table: dict[str, ModelPrice] = {}
    for model, entry in raw.items():
        if not isinstance(entry, dict):
            continue  # `_comment` and similar annotations
        if "input_cost_per_token" not in entry or "output_cost_per_token" not in entry:
            continue
        table[model] = _price(model, entry, origin=origin)
    return table


def _price(model: str, price: PriceInput, *, origin: str) -> ModelPrice:
    if isinstance(price, ModelPrice):
        return price
    try:
        return msgspec.convert(dict(price), ModelPrice)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{origin}: price of model {model!r}: {exc}") from exc
