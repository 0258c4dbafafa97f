"""Prices in LiteLLM's format; cached tokens at the cache-read rate, never twice; unknown is None."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa_stream import ModelPrice, PriceTable

TABLE = PriceTable(
    {
        "m": ModelPrice(
            input_cost_per_token=2.0,
            output_cost_per_token=8.0,
            cache_read_input_token_cost=0.5,
            output_cost_per_reasoning_token=10.0,
        ),
        "plain": ModelPrice(input_cost_per_token=1.0, output_cost_per_token=1.0),
    }
)


def test_cached_tokens_are_priced_at_the_cache_read_rate_and_not_again_as_input() -> None:
    cost = TABLE.cost("m", input_tokens=100, cached_input_tokens=40, output_tokens=0)
    assert cost == 60 * 2.0 + 40 * 0.5


def test_reasoning_tokens_use_their_own_price_and_are_part_of_output() -> None:
    cost = TABLE.cost("m", input_tokens=0, output_tokens=10, reasoning_tokens=4)
    assert cost == 6 * 8.0 + 4 * 10.0


def test_missing_cache_price_falls_back_to_the_input_price() -> None:
    assert TABLE.cost("plain", input_tokens=10, cached_input_tokens=10, output_tokens=0) == 10.0


def test_unknown_model_or_unknown_tokens_cost_none_not_zero() -> None:
    assert TABLE.cost("nope", input_tokens=1, output_tokens=1) is None
    assert TABLE.cost("m", input_tokens=None, output_tokens=1) is None


@pytest.mark.parametrize("name", ["gpt-4.1-mini", "gpt-4.1-mini-2025-04-14", "openai/gpt-4.1-mini", "GPT-4.1-MINI"])
def test_builtin_table_finds_dated_and_prefixed_names(name: str) -> None:
    price = PriceTable.builtin().lookup(name)
    assert price is not None
    assert price.input_cost_per_token == 4e-7


def test_litellm_file_is_loaded_and_non_token_entries_skipped(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "sample_spec": {"max_tokens": "set to max"},
                "my-model": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6, "mode": "chat"},
                "dall-e-3": {"output_cost_per_image": 0.04, "mode": "image_generation"},
            }
        )
    )
    table = PriceTable.from_litellm_file(path)
    assert len(table) == 1
    assert table.cost("my-model", input_tokens=1_000_000, output_tokens=0) == pytest.approx(1.0)


def test_bad_price_file_names_the_file_and_the_model(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"m": {"input_cost_per_token": "cheap", "output_cost_per_token": 1}}))
    with pytest.raises(ValueError, match=r"bad\.json.*'m'.*input_cost_per_token"):
        PriceTable.from_litellm_file(path)
    with pytest.raises(ValueError, match=r"missing\.json"):
        PriceTable.from_litellm_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        PriceTable.from_litellm_file(tmp_path / "broken.json")


def test_overrides_replace_builtin_prices() -> None:
    table = PriceTable.builtin().updated({"gpt-4.1": {"input_cost_per_token": 1.0, "output_cost_per_token": 1.0}})
    assert table.cost("gpt-4.1", input_tokens=1, output_tokens=1) == 2.0
