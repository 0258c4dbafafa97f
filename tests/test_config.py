"""Presets are validated once, normalized to labelled Slots, and every error names source, preset, field, value."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from moa_stream import ConfigError, Preset, SelfMoA, Slot, load_config, self_moa, validate_presets


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "moa.toml"
    path.write_text(text, encoding="utf-8")
    return path


def assert_names(error: ConfigError, *, source: str, preset: str | None, field: str | None, value: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{source}: "), message
    if preset is not None:
        assert f"preset {preset!r}" in message, message
    if field is not None:
        assert f"field {field!r}" in message, message
    assert value in message, message


def invalid(**fields: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        validate_presets({"trio": Preset(**fields)})
    return caught.value


def invalid_toml(tmp_path: Path, text: str) -> tuple[ConfigError, str]:
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value, str(path)


# --- normalization -----------------------------------------------------------------------------


def test_model_names_become_slots_labelled_by_model_with_repeats_numbered() -> None:
    [(name, preset)] = validate_presets(
        {"trio": Preset(references=["gpt-4.1-mini", "gpt-4.1-mini", "claude"], aggregator="gpt-4o")}
    ).items()
    assert name == "trio"
    assert preset.reference_layers() == [
        [
            Slot(model="gpt-4.1-mini", label="gpt-4.1-mini"),
            Slot(model="gpt-4.1-mini", label="gpt-4.1-mini#2"),
            Slot(model="claude", label="claude"),
        ]
    ]
    assert preset.aggregator_slot() == Slot(model="gpt-4o", label="gpt-4o")
    assert preset.references == []
    assert preset.self_moa is None


def test_aggregator_is_labelled_after_the_references_so_they_keep_the_plain_model_name() -> None:
    preset = validate_presets({"p": Preset(references=["m"], aggregator="m")})["p"]
    assert [slot.label for slot in preset.reference_layers()[0]] == ["m"]
    assert preset.aggregator_slot().label == "m#2"


def test_explicit_labels_are_kept_and_generated_labels_step_around_them() -> None:
    preset = validate_presets({"p": Preset(references=["m", Slot(model="other", label="m#2"), "m"], aggregator="agg")})[
        "p"
    ]
    assert [slot.label for slot in preset.reference_layers()[0]] == ["m", "m#2", "m#3"]


def test_labels_are_unique_across_layers() -> None:
    preset = validate_presets({"p": Preset(layers=[["a", "b"], ["a"]], aggregator="b")})["p"]
    labels = [[slot.label for slot in layer] for layer in preset.reference_layers()]
    assert labels == [["a", "b"], ["a#2"]]
    assert preset.aggregator_slot().label == "b#2"


def test_validating_a_validated_preset_changes_nothing() -> None:
    once = validate_presets({"p": Preset(layers=[["a", "a"], ["b"]], aggregator="a", quorum=1)})
    assert validate_presets(once) == once


def test_ints_are_accepted_where_seconds_are_expected() -> None:
    preset = validate_presets({"p": Preset(references=["a"], aggregator="b", grace=1, reference_timeout=30)})["p"]
    assert preset.grace == 1.0
    assert isinstance(preset.grace, float)
    assert isinstance(preset.reference_timeout, float)


def test_a_python_client_is_kept_on_its_slot() -> None:
    client = object()
    preset = validate_presets({"p": Preset(references=[Slot(model="a", client=client)], aggregator="b")})["p"]
    assert preset.reference_layers()[0][0].client is client


def test_base_url_without_api_key_env_is_a_keyless_upstream() -> None:
    slot = Slot(model="llama", base_url="http://localhost:8000/v1")
    preset = validate_presets({"p": Preset(references=[slot], aggregator="b")})["p"]
    assert preset.reference_layers()[0][0].api_key_env is None


def test_validation_does_not_read_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_KEY", raising=False)
    slot = Slot(model="llama", base_url="https://llm.internal/v1", api_key_env="LOCAL_KEY")
    preset = validate_presets({"p": Preset(references=[slot], aggregator="b")})["p"]
    assert preset.reference_layers()[0][0].api_key_env == "LOCAL_KEY"


def test_reference_layers_and_aggregator_slot_refuse_an_unvalidated_preset() -> None:
    preset = Preset(references=["a"], aggregator="b")
    with pytest.raises(ConfigError, match="validate_presets"):
        preset.reference_layers()
    with pytest.raises(ConfigError, match="validate_presets"):
        preset.aggregator_slot()


# --- Self-MoA ----------------------------------------------------------------------------------


def test_self_moa_makes_n_samples_with_seeds_one_to_n_and_numbered_labels() -> None:
    assert self_moa("gpt-4o", 3) == [
        Slot(model="gpt-4o", label="gpt-4o#1", seed=1),
        Slot(model="gpt-4o", label="gpt-4o#2", seed=2),
        Slot(model="gpt-4o", label="gpt-4o#3", seed=3),
    ]


def test_self_moa_takes_per_sample_lists_and_shared_slot_fields() -> None:
    slots = self_moa(
        "m",
        2,
        temperatures=[0.2, 0.9],
        systems=["be terse", "be thorough"],
        base_url="http://localhost:8000/v1",
        label="local",
    )
    assert slots == [
        Slot(
            model="m", label="local#1", seed=1, temperature=0.2, system="be terse", base_url="http://localhost:8000/v1"
        ),
        Slot(
            model="m",
            label="local#2",
            seed=2,
            temperature=0.9,
            system="be thorough",
            base_url="http://localhost:8000/v1",
        ),
    ]


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"n": 0}, "n", "0"),
        ({"n": 3, "seeds": [1, 2]}, "seeds", "2 values"),
        ({"n": 2, "temperature": 0.5, "temperatures": [0.1, 0.2]}, "temperature", "temperatures"),
        ({"n": 2, "temprature": 0.5}, "temprature", "did you mean 'temperature'?"),
    ],
    ids=["n-below-one", "list-length", "single-and-list", "unknown-slot-field"],
)
def test_self_moa_helper_rejects_bad_arguments_naming_the_argument(
    kwargs: dict[str, Any], field: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        self_moa("m", **kwargs)
    assert_names(caught.value, source="self_moa()", preset=None, field=field, value=value)


def test_self_moa_field_becomes_one_layer_of_samples() -> None:
    preset = validate_presets({"solo": Preset(self_moa=SelfMoA(model="m", n=3), aggregator="m")})["solo"]
    assert preset.reference_layers() == [self_moa("m", 3)]
    assert preset.aggregator_slot() == Slot(model="m", label="m")


def test_toml_self_moa_table_equals_the_self_moa_shorthand(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [presets.solo]
        self_moa = { model = "gpt-4o", n = 3, temperatures = [0.3, 0.7, 1.0] }
        aggregator = "gpt-4o"
        """,
    )
    expected = validate_presets(
        {"solo": Preset(references=self_moa("gpt-4o", 3, temperatures=[0.3, 0.7, 1.0]), aggregator="gpt-4o")}
    )
    assert load_config(path) == expected


# --- TOML ----------------------------------------------------------------------------------------


FULL_TOML = """
[presets.deep]
layers = [["gpt-4.1-mini", "claude-sonnet"], ["gpt-4.1-mini"]]
aggregator = "gpt-4o"
quorum = 1
grace = 2
reference_timeout = 30.0
cadence = "every_n"
every_n = 3
usage = "aggregator"

[presets.local]
references = [
    "gpt-4.1-mini",
    { model = "llama-3.1-8b", label = "llama", base_url = "http://localhost:8000/v1", extra = { top_p = 0.9 } },
    { model = "qwen", base_url = "https://llm.internal/v1", api_key_env = "INTERNAL_KEY", temperature = 0.7 },
]
aggregator = { model = "gpt-4o", system = "Answer in English." }
placement = "user"
template = "Advice from other models:\\n{references}"
silent_degradation = true
on_all_failed = "error"
tool_result_chars = 500
cache_entries = 16
cache_ttl_s = 600
"""


def test_toml_file_with_two_presets_equals_the_equivalent_python_presets(tmp_path: Path) -> None:
    python = {
        "deep": Preset(
            layers=[["gpt-4.1-mini", "claude-sonnet"], ["gpt-4.1-mini"]],
            aggregator="gpt-4o",
            quorum=1,
            grace=2.0,
            reference_timeout=30.0,
            cadence="every_n",
            every_n=3,
            usage="aggregator",
        ),
        "local": Preset(
            references=[
                "gpt-4.1-mini",
                Slot(
                    model="llama-3.1-8b",
                    label="llama",
                    base_url="http://localhost:8000/v1",
                    extra={"top_p": 0.9},
                ),
                Slot(model="qwen", base_url="https://llm.internal/v1", api_key_env="INTERNAL_KEY", temperature=0.7),
            ],
            aggregator=Slot(model="gpt-4o", system="Answer in English."),
            placement="user",
            template="Advice from other models:\n{references}",
            silent_degradation=True,
            on_all_failed="error",
            tool_result_chars=500,
            cache_entries=16,
            cache_ttl_s=600.0,
        ),
    }
    loaded = load_config(write_toml(tmp_path, FULL_TOML))
    assert loaded == validate_presets(python)
    assert [slot.label for slot in loaded["deep"].reference_layers()[1]] == ["gpt-4.1-mini#2"]


def test_a_toml_file_without_presets_loads_no_presets(tmp_path: Path) -> None:
    assert load_config(write_toml(tmp_path, "# nothing yet\n")) == {}


def test_toml_errors_name_the_file_in_the_documented_shape(tmp_path: Path) -> None:
    error, source = invalid_toml(
        tmp_path, '[presets.trio]\nreferences = ["a", "b", "c"]\naggregator = "d"\nquorum = 4\n'
    )
    assert str(error) == f"{source}: preset 'trio': field 'quorum': 4 is larger than the 3 references of layer 1"


def test_toml_value_errors_name_the_file_preset_field_and_value(tmp_path: Path) -> None:
    error, source = invalid_toml(tmp_path, '[presets.trio]\nreferences = ["a"]\naggregator = "b"\ngrace = "soon"\n')
    assert_names(error, source=source, preset="trio", field="grace", value="'soon'")
    assert "moa.toml" in source


def test_missing_file_is_reported_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert_names(caught.value, source=str(path), preset=None, field=None, value="No such file")


def test_unreadable_file_is_reported_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert_names(caught.value, source=str(tmp_path), preset=None, field=None, value="cannot read")


def test_non_utf8_file_is_reported_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "moa.toml"
    path.write_bytes(b'[presets.trio]\naggregator = "\xff"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert_names(caught.value, source=str(path), preset=None, field=None, value="not UTF-8")


def test_invalid_toml_reports_tomllibs_line_and_column(tmp_path: Path) -> None:
    error, source = invalid_toml(tmp_path, '[presets.trio]\nreferences = ["a"]\nquorum = = 1\n')
    assert_names(error, source=source, preset=None, field=None, value="invalid TOML")
    assert "line 3" in str(error)
    assert "column" in str(error)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('[preset.trio]\naggregator = "a"\n', "top-level key 'preset': unknown key; did you mean 'presets'?"),
        ("presets = 3\n", "'presets' must be a table"),
    ],
    ids=["unknown-top-level-key", "presets-not-a-table"],
)
def test_toml_document_shape_errors_name_the_file(tmp_path: Path, text: str, value: str) -> None:
    error, source = invalid_toml(tmp_path, text)
    assert_names(error, source=source, preset=None, field=None, value=value)


def test_a_preset_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    error, source = invalid_toml(tmp_path, "[presets]\ntrio = 3\n")
    assert_names(error, source=source, preset="trio", field=None, value="got 3")


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ('references = ["a"]\naggregator = "b"\nqourum = 1\n', "qourum", "did you mean 'quorum'?"),
        ('references = [{ modle = "a" }]\naggregator = "b"\n', "references[0].modle", "did you mean 'model'?"),
        (
            'layers = [["a"], [{ model = "a", sed = 1 }]]\naggregator = "b"\n',
            "layers[1][0].sed",
            "did you mean 'seed'?",
        ),
        ('references = ["a"]\naggregator = { model = "b", tmp = 1 }\n', "aggregator.tmp", "unknown key; valid keys:"),
        ('self_moa = { model = "a", n = 2, seed = [1, 2] }\naggregator = "b"\n', "self_moa.seed", "'seeds'"),
        (
            'references = ["a"]\naggregator = "b"\nxyzzy = 1\n',
            "xyzzy",
            "valid keys: aggregator, aggregator_retries, cache_entries",
        ),
    ],
    ids=["preset-table", "reference-table", "layer-table", "aggregator-table", "self-moa-table", "no-close-match"],
)
def test_unknown_toml_keys_are_named_with_the_closest_valid_key(
    tmp_path: Path, body: str, field: str, value: str
) -> None:
    error, source = invalid_toml(tmp_path, "[presets.trio]\n" + body)
    assert_names(error, source=source, preset="trio", field=field, value=value)


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        (
            'references = [{ model = "a", client = "x" }]\naggregator = "b"\n',
            "references[0].client",
            "only be given in Python",
        ),
        ('references = [{ label = "a" }]\naggregator = "b"\n', "references[0].model", "missing"),
        ('self_moa = { model = "a" }\naggregator = "b"\n', "self_moa.n", "missing"),
    ],
    ids=["client-in-toml", "slot-without-model", "self-moa-without-n"],
)
def test_toml_slot_tables_need_their_required_keys_and_no_client(
    tmp_path: Path, body: str, field: str, value: str
) -> None:
    error, source = invalid_toml(tmp_path, "[presets.trio]\n" + body)
    assert_names(error, source=source, preset="trio", field=field, value=value)


def test_invalid_preset_name_in_toml_is_named(tmp_path: Path) -> None:
    error, source = invalid_toml(tmp_path, '[presets."two words"]\nreferences = ["a"]\naggregator = "b"\n')
    assert_names(error, source=source, preset="two words", field=None, value="invalid preset name")


# --- validation errors (Python presets) --------------------------------------------------------

REFS: dict[str, Any] = {"references": ["a", "b", "c"], "aggregator": "d"}


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({**REFS, "grace": "x"}, "grace", "expected a number, got 'x'"),
        ({**REFS, "quorum": True}, "quorum", "got True"),
        ({**REFS, "silent_degradation": "yes"}, "silent_degradation", "got 'yes'"),
        ({**REFS, "cadence": "sometimes"}, "cadence", "got 'sometimes'"),
        ({**REFS, "usage": "all"}, "usage", "got 'all'"),
        ({"references": "a", "aggregator": "b"}, "references", "got 'a'"),
        ({"references": ["a", 3], "aggregator": "b"}, "references[1]", "got 3"),
        ({"layers": ["a", "b"], "aggregator": "b"}, "layers[0]", "got 'a'"),
        ({"references": [Slot(model="a", seed="1")], "aggregator": "b"}, "references[0].seed", "got '1'"),  # type: ignore[arg-type]
        ({"references": [Slot(model="a", extra={1: 2})], "aggregator": "b"}, "references[0].extra", "{1: 2}"),  # type: ignore[dict-item]
        ({"self_moa": "a", "aggregator": "b"}, "self_moa", "got 'a'"),
    ],
    ids=[
        "float",
        "bool-for-int",
        "bool",
        "cadence-literal",
        "usage-literal",
        "references-not-a-list",
        "slot-not-a-slot",
        "layer-not-a-list",
        "slot-field",
        "extra-keys",
        "self-moa-not-a-struct",
    ],
)
def test_wrong_types_are_named(fields: dict[str, Any], field: str, value: str) -> None:
    assert_names(invalid(**fields), source="presets=", preset="trio", field=field, value=value)


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"aggregator": "b"}, "references", "is empty"),
        ({"references": [], "layers": [], "aggregator": "b"}, "references", "is empty"),
        ({"references": ["a"], "layers": [["b"]], "aggregator": "b"}, "layers", "'references'"),
        ({"references": ["a"], "self_moa": SelfMoA(model="m", n=2), "aggregator": "b"}, "self_moa", "'references'"),
        ({"layers": [["a"], []], "aggregator": "b"}, "layers[1]", "empty layer"),
    ],
    ids=["no-references", "empty-lists", "references-and-layers", "references-and-self-moa", "empty-layer"],
)
def test_reference_structure_errors_are_named(fields: dict[str, Any], field: str, value: str) -> None:
    assert_names(invalid(**fields), source="presets=", preset="trio", field=field, value=value)


def test_missing_aggregator_is_named() -> None:
    assert_names(invalid(references=["a"]), source="presets=", preset="trio", field="aggregator", value="missing")


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"references": ["a", "moa:other"], "aggregator": "b"}, "references[1].model", "'moa:other'"),
        ({"layers": [["a"], [Slot(model="MOA:x")]], "aggregator": "b"}, "layers[1][0].model", "'MOA:x'"),
        ({"references": ["a"], "aggregator": "moa:other"}, "aggregator.model", "'moa:other'"),
        ({"self_moa": SelfMoA(model="moa:x", n=2), "aggregator": "b"}, "self_moa.model", "'moa:x'"),
    ],
    ids=["reference", "layer", "aggregator", "self-moa"],
)
def test_a_slot_naming_a_preset_is_refused(fields: dict[str, Any], field: str, value: str) -> None:
    assert_names(invalid(**fields), source="presets=", preset="trio", field=field, value=value)


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"references": ["a", ""], "aggregator": "b"}, "references[1].model", "empty model name ''"),
        ({"references": ["a"], "aggregator": Slot(model="  ")}, "aggregator.model", "empty model name '  '"),
    ],
    ids=["reference", "aggregator"],
)
def test_empty_model_names_are_refused(fields: dict[str, Any], field: str, value: str) -> None:
    assert_names(invalid(**fields), source="presets=", preset="trio", field=field, value=value)


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"reference_timeout": 0}, "reference_timeout", "must be > 0, got 0"),
        ({"reference_timeout": -5.0}, "reference_timeout", "got -5.0"),
        ({"cache_ttl_s": 0.0}, "cache_ttl_s", "got 0.0"),
        ({"grace": -0.5}, "grace", "must be >= 0, got -0.5"),
        ({"grace": math.nan}, "grace", "got nan"),
        ({"cadence": "every_n", "every_n": 0}, "every_n", "must be >= 1, got 0"),
        ({"tool_result_chars": 99}, "tool_result_chars", "must be >= 100, got 99"),
        ({"cache_entries": 0}, "cache_entries", "must be >= 1, got 0"),
    ],
    ids=[
        "timeout-zero",
        "timeout-negative",
        "ttl-zero",
        "grace-negative",
        "grace-nan",
        "every-n",
        "tool-result-chars",
        "cache-entries",
    ],
)
def test_out_of_range_numbers_are_named(fields: dict[str, Any], field: str, value: str) -> None:
    assert_names(invalid(**REFS, **fields), source="presets=", preset="trio", field=field, value=value)


@pytest.mark.parametrize(
    ("fields", "value"),
    [
        ({**REFS, "quorum": 0}, "0 is less than 1"),
        ({**REFS, "quorum": 4}, "4 is larger than the 3 references of layer 1"),
        (
            {"layers": [["a", "b"], ["c"]], "aggregator": "d", "quorum": 2},
            "2 is larger than the 1 reference of layer 2",
        ),
    ],
    ids=["below-one", "above-layer-size", "above-second-layer"],
)
def test_quorum_must_fit_every_layer(fields: dict[str, Any], value: str) -> None:
    assert_names(invalid(**fields), source="presets=", preset="trio", field="quorum", value=value)


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("Other models said: {answers}", "'Other models said: {answers}' has no '{references}' placeholder"),
        ("Escaped: {{references}}", "has no '{references}' placeholder"),
        ("{references} and {answers}", "has placeholder {answers}"),
        ('{references} as JSON: {"a": 1}', 'has placeholder {"a"}'),
        ("{references} {", "is not a valid format string"),
        ("{references:d}", "is not a valid format string"),
    ],
    ids=["no-placeholder", "escaped-placeholder", "other-placeholder", "literal-braces", "unbalanced", "bad-spec"],
)
def test_template_must_be_a_format_string_with_only_the_references_placeholder(template: str, value: str) -> None:
    error = invalid(**REFS, template=template)
    assert_names(error, source="presets=", preset="trio", field="template", value=value)


def test_template_may_hold_doubled_literal_braces() -> None:
    template = 'Answers ({{"format": "numbered"}}):\n{references}'
    preset = validate_presets({"p": Preset(**REFS, template=template)})["p"]
    assert preset.template == template


@pytest.mark.parametrize(
    ("slot", "field", "value"),
    [
        (Slot(model="a", api_key_env="MY_KEY"), "references[0].api_key_env", "'MY_KEY' is given without base_url"),
        (Slot(model="a", client=object(), base_url="http://x/v1"), "references[0].base_url", "'http://x/v1'"),
        (Slot(model="a", base_url="localhost:8000"), "references[0].base_url", "'localhost:8000'"),
        (Slot(model="a", temperature=-1.0), "references[0].temperature", "got -1.0"),
        (Slot(model="a", max_tokens=0), "references[0].max_tokens", "got 0"),
        (Slot(model="a", extra={"stream": False}), "references[0].extra", "'stream'"),
        (Slot(model="a", label=" "), "references[0].label", "blank label ' '"),
    ],
    ids=[
        "api-key-env-without-base-url",
        "client-and-base-url",
        "base-url-not-http",
        "negative-temperature",
        "max-tokens-zero",
        "reserved-extra",
        "blank-label",
    ],
)
def test_slot_upstream_and_parameter_errors_are_named(slot: Slot, field: str, value: str) -> None:
    error = invalid(references=[slot], aggregator="b")
    assert_names(error, source="presets=", preset="trio", field=field, value=value)


def test_an_api_key_given_instead_of_a_variable_name_is_not_echoed() -> None:
    secret = "sk-proj-0123456789abcdef"
    error = invalid(references=[Slot(model="a", base_url="https://x/v1", api_key_env=secret)], aggregator="b")
    assert_names(error, source="presets=", preset="trio", field="references[0].api_key_env", value="NAME")
    assert secret not in str(error)


@pytest.mark.parametrize(
    ("self_moa_value", "field", "value"),
    [
        (SelfMoA(model="m", n=3, temperatures=[0.1, 0.2]), "self_moa.temperatures", "has 2 values but n is 3"),
        (SelfMoA(model="m", n=2, seeds=[1, 2, 3]), "self_moa.seeds", "has 3 values but n is 2"),
        (SelfMoA(model="m", n=2, systems=["x"]), "self_moa.systems", "has 1 value but n is 2"),
        (SelfMoA(model="m", n=0), "self_moa.n", "got 0"),
    ],
    ids=["temperatures", "seeds", "systems", "n"],
)
def test_self_moa_lists_must_have_n_values(self_moa_value: SelfMoA, field: str, value: str) -> None:
    error = invalid(self_moa=self_moa_value, aggregator="m")
    assert_names(error, source="presets=", preset="trio", field=field, value=value)


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        (
            {"references": [Slot(model="a", label="x"), Slot(model="b", label="x")], "aggregator": "c"},
            "references[1].label",
            "'x'",
        ),
        (
            {"layers": [[Slot(model="a", label="x")], [Slot(model="b", label="x")]], "aggregator": "c"},
            "layers[1][0].label",
            "layers[0][0]",
        ),
        (
            {"references": [Slot(model="a", label="x")], "aggregator": Slot(model="c", label="x")},
            "aggregator.label",
            "'x'",
        ),
    ],
    ids=["same-layer", "across-layers", "aggregator"],
)
def test_duplicate_explicit_labels_within_a_preset_are_refused(fields: dict[str, Any], field: str, value: str) -> None:
    assert_names(invalid(**fields), source="presets=", preset="trio", field=field, value=value)


@pytest.mark.parametrize("name", ["two words", "", "moa:trio", "trio/2"])
def test_invalid_preset_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_presets({name: Preset(references=["a"], aggregator="b")})
    assert_names(caught.value, source="presets=", preset=name, field=None, value="invalid preset name")


def test_a_value_that_is_not_a_preset_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_presets({"trio": "gpt-4o"})  # type: ignore[dict-item]
    assert_names(caught.value, source="presets=", preset="trio", field=None, value="expected a Preset, got 'gpt-4o'")


def test_errors_name_the_source_given_by_the_caller() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_presets({"trio": Preset(references=["a"])}, source="wrap(presets=)")
    assert str(caught.value).startswith("wrap(presets=): preset 'trio': field 'aggregator'")


def test_the_first_error_is_reported() -> None:
    error = invalid(references=["moa:x"], grace=-1.0)
    assert "references[0].model" in str(error)
    assert "grace" not in str(error)


def test_cadence_every_n_needs_its_interval_and_only_it_takes_one() -> None:
    with pytest.raises(ConfigError, match=r"field 'every_n': is required with cadence 'every_n'"):
        validate_presets({"trio": Preset(**REFS, cadence="every_n")})
    with pytest.raises(ConfigError, match=r"field 'every_n': is only used with cadence 'every_n', not 'per_call'"):
        validate_presets({"trio": Preset(**REFS, cadence="per_call", every_n=3)})


def test_a_slot_given_positionally_says_its_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError) as error:
        Slot("gpt-4o", "main")  # type: ignore[misc]
    assert str(error.value) == (
        "Slot() takes keyword arguments only, as in Slot(model=...); its fields: model, label, client, base_url, "
        "api_key_env, system, temperature, max_tokens, seed, extra, api"
    )
    with pytest.raises(TypeError, match=r"^Preset\(\) takes keyword arguments only"):
        Preset(["a", "b"])  # type: ignore[misc]


def test_the_samples_self_moa_makes_are_a_presets_self_moa() -> None:
    preset = validate_presets({"self": Preset(self_moa=self_moa("m", 3), aggregator="agg")})["self"]
    assert preset.reference_layers() == [self_moa("m", 3)]
