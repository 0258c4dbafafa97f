"""`moa-stream bench --base-url`: the endpoint bench against the simulator served over loopback HTTP.

Functional only: the figures are checked for their structure and their consistency with each other
(counts, p50 <= p99, TTFT <= E2EL), never for their size.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest

from benchmarks import endpoint
from benchmarks._common import SimProcess, has_fast_mode
from benchmarks._endpoint_measure import Progress, block_sizes
from moa_stream._cli import _main as _cli
from moa_stream.testing import Fault, SimModel, SimResponse, Simulator

from .conftest import ServerThread

MODELS = [
    SimModel(name="sim-a", reply_tokens=5),
    SimModel(name="sim-ref", reply_tokens=3),
    SimModel(name="sim-agg", reply_tokens=4),
    # A 401 whose message repeats the credentials it was sent, as some gateways do.
    SimModel(name="locked", fault=Fault(kind="echo_key")),
]
PRESET = '[presets.pair]\nreferences = ["sim-ref", "sim-a"]\naggregator = "sim-agg"\n'
SECRET = "sk-bench-test-0123456789"
VARIANTS = ["bare", "wrapped", *(["fast"] if has_fast_mode() else []), "moa:pair", "aggregator"]
LEVELS = (1, 2)
REQUESTS = 3


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(MODELS) as served:
        yield served


@pytest.fixture(scope="module")
def out_dir(sim: SimProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run with a preset at two levels, shared by the tests that read what it wrote."""
    work = tmp_path_factory.mktemp("endpoint")
    (work / "moa.toml").write_text(PRESET)
    config = endpoint.EndpointConfig(
        base_url=sim.base_url,
        model="sim-a",
        concurrency=LEVELS,
        requests=REQUESTS,
        max_tokens=4,
        config=work / "moa.toml",
    )
    endpoint.run(config, out_dir=work / "out", command="moa-stream bench --base-url ...")
    return work / "out"


@pytest.fixture(scope="module")
def document(out_dir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out_dir / "endpoint.json").read_text())
    return loaded


def _quantiles(figures: Mapping[str, Any]) -> list[float]:
    return [figures[name] for name in ("min", "p50", "p90", "p95", "p99", "max")]


def test_every_variant_is_measured_at_every_level(document: dict[str, Any]) -> None:
    levels = document["results"]["levels"]
    assert list(levels) == [str(level) for level in LEVELS]
    for level in LEVELS:
        assert levels[str(level)]["concurrency"] == level
        assert list(levels[str(level)]["variants"]) == VARIANTS
    assert document["config"]["variants"] == VARIANTS
    assert document["config"]["models"]["aggregator"] == "sim-agg"
    assert document["config"]["models"]["moa:pair"] == "moa:pair"
    table = document["table"]
    assert len(table["rows"]) == len(LEVELS) * len(VARIANTS)
    assert all(len(row) == len(table["headers"]) for row in table["rows"])


def test_every_measured_request_is_counted_once(document: dict[str, Any]) -> None:
    for entry in document["results"]["levels"].values():
        for name, row in entry["variants"].items():
            assert (row["requests"], row["ok"], row["errors"], row["warm_up_errors"]) == (REQUESTS, REQUESTS, 0, 0)
            assert row["first_error"] is None
            assert row["rounds"] == len(block_sizes(REQUESTS, entry["concurrency"]))
            for metric in ("ttft_ms", "e2el_ms", "request_output_tokens_per_s"):
                assert row[metric]["n"] == REQUESTS, (name, metric)
            # A gap between each two chunks with text, in each request.
            assert row["itl_ms"]["n"] == row["text_chunks"] - REQUESTS
            assert row["chunks"] >= row["text_chunks"] >= REQUESTS


def test_percentiles_are_ordered_and_first_tokens_come_before_the_end(document: dict[str, Any]) -> None:
    for entry in document["results"]["levels"].values():
        for name, row in entry["variants"].items():
            for metric in ("ttft_ms", "itl_ms", "tpot_ms", "e2el_ms", "request_output_tokens_per_s"):
                figures = row[metric]
                assert _quantiles(figures) == sorted(_quantiles(figures)), (name, metric)
                assert figures["min"] <= figures["mean"] <= figures["max"]
            # Each request's first token came before its end, so every order statistic does too.
            for q in ("min", "p50", "p99", "max"):
                assert row["ttft_ms"][q] <= row["e2el_ms"][q], (name, q)


def test_tokens_come_from_the_usage_chunk_and_rates_from_the_same_counts(document: dict[str, Any]) -> None:
    for entry in document["results"]["levels"].values():
        variants = entry["variants"]
        for row in variants.values():
            tokens = row["output_tokens"]
            assert (tokens["from_usage"], tokens["from_chunks"]) == (REQUESTS, 0)
            assert tokens["per_request"]["n"] == REQUESTS
            assert tokens["total"] == tokens["per_request"]["mean"] * REQUESTS
            assert row["output_tokens_per_s"] == pytest.approx(tokens["total"] / row["wall_s"])
            assert row["requests_per_s"] == pytest.approx(REQUESTS / row["wall_s"])
            assert row["cpu_us_per_chunk"] == pytest.approx(row["cpu_s"] / row["chunks"] * 1e6)
            assert row["cpu_ms_per_call"] == pytest.approx(row["cpu_s"] / REQUESTS * 1e3)
        # The same request to the same model: the same tokens, wrapped or not; the preset's usage
        # chunk reports its aggregator's call, the same as the aggregator alone.
        totals = {name: row["output_tokens"]["total"] for name, row in variants.items()}
        assert totals["bare"] == totals["wrapped"] == totals.get("fast", totals["bare"])
        assert totals["moa:pair"] == totals["aggregator"]


def test_a_preset_is_compared_with_its_aggregator_alone(document: dict[str, Any]) -> None:
    comparison = document["results"]["preset"]
    assert comparison["preset"] == "moa:pair"
    assert list(comparison["levels"]) == [str(level) for level in LEVELS]
    for key, row in comparison["levels"].items():
        variants = document["results"]["levels"][key]["variants"]
        for q in ("p50", "p99"):
            ours, alone = variants["moa:pair"]["ttft_ms"][q], variants["aggregator"]["ttft_ms"][q]
            assert (row[f"preset_ttft_{q}_ms"], row[f"aggregator_ttft_{q}_ms"]) == (ours, alone)
            assert row[f"added_ttft_{q}_ms"] == pytest.approx(ours - alone)
            assert row[f"ttft_{q}_ratio"] == pytest.approx(ours / alone)
    assert any(note.startswith("moa:pair at 1 in flight: TTFT p50") for note in document["notes"])


def test_json_records_the_run_and_a_plot_is_drawn(document: dict[str, Any], out_dir: Path) -> None:
    assert document["section"] == endpoint.NAME
    assert document["command"] == "moa-stream bench --base-url ..."
    assert document["config"]["requests"] == REQUESTS
    assert document["config"]["concurrency"] == list(LEVELS)
    assert document["config"]["api_key_env"] == "OPENAI_API_KEY"
    pytest.importorskip("matplotlib")
    assert (out_dir / "endpoint.png").read_bytes().startswith(b"\x89PNG")


def test_without_matplotlib_only_json_is_written_and_the_reader_is_told(
    sim: SimProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(endpoint, "pyplot", lambda: None)
    config = endpoint.EndpointConfig(base_url=sim.base_url, model="sim-a", concurrency=(1,), requests=1, max_tokens=2)
    endpoint.run(config, out_dir=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["endpoint.json"]
    assert "matplotlib is not installed, so no PNG plot" in capsys.readouterr().out


def test_bench_command_measures_an_endpoint(sim: SimProcess, tmp_path: Path) -> None:
    argv = ["bench", "--base-url", sim.base_url, "--model", "sim-a", "--concurrency", "2", "--requests", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "moa_stream", *argv, "--max-tokens", "2", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert endpoint.TITLE in result.stdout
    assert "\r" not in result.stderr  # no progress bar into a pipe
    document = json.loads((tmp_path / "endpoint.json").read_text())
    assert document["command"].startswith(f"moa-stream bench --base-url {sim.base_url} --model sim-a")
    assert list(document["results"]["levels"]) == ["2"]


# -- what goes wrong: one line naming the problem, exit 2 ------------------------------------------


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `moa-stream bench ARGV`, expect exit 2 and one line on stderr; that line."""
    code = _cli.main(["bench", *argv, "--requests", "1", "--concurrency", "1", "--max-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("moa-stream bench: ")
    return err


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_endpoint_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://user:pw-not-shown@127.0.0.1:{_closed_port()}/v1"
    err = _fails(["--base-url", url, "--model", "m", "--out-dir", str(tmp_path)], capsys)
    assert "cannot reach http://127.0.0.1:" in err
    assert "pw-not-shown" not in err
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_a_refused_key_is_named_but_never_shown(
    sim: SimProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BENCH_TEST_KEY", SECRET)
    argv = ["--base-url", sim.base_url, "--model", "locked", "--api-key-env", "BENCH_TEST_KEY"]
    err = _fails([*argv, "--out-dir", str(tmp_path)], capsys)
    assert "refused the API key from $BENCH_TEST_KEY (HTTP 401" in err
    assert SECRET not in err
    assert "[REDACTED]" in err  # the server did repeat it


def test_a_key_variable_that_is_not_set_is_named(
    sim: SimProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BENCH_TEST_UNSET", raising=False)
    err = _fails(["--base-url", sim.base_url, "--model", "sim-a", "--api-key-env", "BENCH_TEST_UNSET"], capsys)
    assert "$BENCH_TEST_UNSET is not set" in err


def test_a_remote_endpoint_needs_a_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # 192.0.2.0/24 is reserved for documentation: the check comes before any request.
    err = _fails(["--base-url", "http://192.0.2.1/v1", "--model", "m"], capsys)
    assert "$OPENAI_API_KEY is not set" in err
    assert "--api-key-env" in err


class ModelsOnly(Simulator):
    """The simulator, answering a chat request for a model it does not list with OpenAI's 404."""

    async def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, *, read_timeout: float | None = None
    ) -> SimResponse:
        if path.endswith("/chat/completions"):
            model = json.loads(body)["model"]
            if model not in {m.name for m in self.models}:
                message = f"The model `{model}` does not exist or you do not have access to it."
                error = {"error": {"message": message, "type": "invalid_request_error", "code": "model_not_found"}}

                async def document() -> AsyncIterator[bytes]:
                    yield msgspec.json.encode(error)

                return SimResponse(status=404, headers=[("content-type", "application/json")], body=document())
        return await super().handle(method, path, headers, body, read_timeout=read_timeout)


def test_an_unknown_model_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread(ModelsOnly(MODELS)) as server:
        err = _fails(["--base-url", server.base_url, "--model", "gpt-none", "--out-dir", str(tmp_path)], capsys)
    assert "does not serve model 'gpt-none' (HTTP 404: The model `gpt-none` does not exist" in err
    assert "check --model" in err


def test_config_problems_are_named(sim: SimProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--base-url", sim.base_url, "--model", "sim-a"]
    err = _fails([*base, "--config", str(tmp_path / "missing.toml")], capsys)
    assert "missing.toml" in err
    (tmp_path / "moa.toml").write_text(PRESET)
    err = _fails([*base, "--config", str(tmp_path / "moa.toml"), "--preset", "other"], capsys)
    assert "no preset 'other'; the presets are: pair" in err


def test_a_base_url_that_is_not_http_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(["--base-url", "localhost:8000/v1", "--model", "m"], capsys)
    assert "--base-url must be an http(s) URL" in err


# -- the command's flags ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--base-url", "http://127.0.0.1:1/v1"], "--base-url needs --model"),
        (["--model", "m"], "--model: only with --base-url"),
        (["--concurrency", "2", "--requests", "3"], "--concurrency, --requests: only with --base-url"),
        (["--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--quick"], "--base-url measures an endpoint"),
        (["--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--sections", "chunks"], "--sections and --quick"),
        (["--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--preset", "p"], "--preset needs --config"),
        (
            ["--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--concurrency", "0"],
            "must be a whole number >= 1, got '0'",
        ),
        (
            ["--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--requests", "x"],
            "--requests: must be a whole number >= 1, got 'x'",
        ),
    ],
)
def test_bench_flags_are_checked_before_anything_runs(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _cli.main(["bench", *argv])
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_options_are_checked_when_the_config_is_made() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"concurrency": ()}, "concurrency levels must be >= 1"),
        ({"requests": 0}, "requests must be >= 1"),
        ({"preset": "p"}, "a preset needs the moa.toml"),
        ({"model": ""}, "--model must name a model"),
        ({"api_key_env": ""}, "--api-key-env must name"),
    ]
    for options, said in cases:
        with pytest.raises(endpoint.EndpointError, match=said):
            endpoint.EndpointConfig(**{"base_url": "http://127.0.0.1/v1", "model": "m", **options})


def test_credentials_in_a_base_url_are_not_shown() -> None:
    assert endpoint.shown_url("https://user:secret@example.com:8443/v1") == "https://example.com:8443/v1"
    assert endpoint.shown_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_requests_are_split_into_blocks_of_at_least_the_level() -> None:
    assert block_sizes(20, 1) == [4, 4, 4, 4, 4]
    assert block_sizes(20, 4) == [4, 4, 4, 4, 4]
    assert block_sizes(20, 8) == [10, 10]
    assert block_sizes(3, 8) == [3]
    assert block_sizes(7, 2) == [3, 2, 2]


# -- the progress bar ------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_drawn_in_place_on_a_terminal_and_erased_at_the_end() -> None:
    screen = Terminal()
    progress = Progress(8, stream=screen)
    progress.advance(2, "concurrency 1")
    progress.advance(6, "concurrency 4")
    drawn = screen.getvalue().split("\r")[1:]
    assert "[" + "#" * 6 + "-" * 18 + "] 2/8 requests  concurrency 1" in drawn[0]
    assert "s left" in drawn[0]
    assert "[" + "#" * 24 + "] 8/8 requests  concurrency 4" in drawn[1]
    assert "left" not in drawn[1]
    progress.close()
    assert screen.getvalue().endswith("\r" + " " * len(drawn[1].rstrip()) + "\r")


def test_progress_bar_stays_silent_when_stderr_is_not_a_terminal() -> None:
    log = io.StringIO()
    progress = Progress(4, stream=log)
    progress.advance(4, "concurrency 1")
    progress.close()
    assert log.getvalue() == ""
