"""`moa-stream demo` as a new user meets it: progress before the answer, one line when the endpoint
is wrong or a key is missing, and the turn asked once."""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import moa_stream
from moa_stream import Preset
from moa_stream._cli import main
from moa_stream._cli._demo import Progress, run_demo
from moa_stream._events import Event
from moa_stream.testing import SimModel, Simulator

from .conftest import ServerThread

# Zero latency: the aggregator's first token comes as fast as the middleware can relay it.
FAST = [SimModel(name=name) for name in ("fast-a", "fast-b", "fast-c")]


class NotFoundServer:
    """A web server that is no OpenAI-compatible API: every request is a 404 with an HTML page."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        paths = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                paths.append(self.path)
                page = b"<html><body><h1>404 Not Found</h1></body></html>"
                self.send_response(404)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> NotFoundServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@pytest.fixture
def not_found() -> Iterator[NotFoundServer]:
    with NotFoundServer() as server:
        yield server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_demo_against_a_closed_port_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    assert main(["demo", "--base-url", f"http://127.0.0.1:{port}/v1", "--trace-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("moa-stream demo: ")
    assert f"http://127.0.0.1:{port}" in err
    assert "could not be reached" in err
    assert "Traceback" not in err
    assert len(list(moa_stream.read_traces(tmp_path / "demo.jsonl"))) == 1  # asked once


def test_demo_against_a_wrong_path_names_the_url_and_the_404_after_one_attempt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, not_found: NotFoundServer
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a loopback endpoint may go without a key
    assert main(["demo", "--base-url", not_found.url, "--model", "m", "--trace-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"moa-stream demo: {not_found.url}/chat/completions answered 404 Not Found "
        "(is --base-url right? OpenAI-compatible APIs usually end in /v1)\n"
    )
    assert not_found.paths == ["/chat/completions"] * 4  # three Self-MoA samples and the aggregator, once each
    assert len(list(moa_stream.read_traces(tmp_path / "demo.jsonl"))) == 1


def test_demo_prints_the_references_of_a_failed_turn_before_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], not_found: NotFoundServer
) -> None:
    assert main(["demo", "--base-url", not_found.url, "--model", "m", "--api-key", "k", "--trace-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count(": error (") == 3
    assert "3/3 done" in out


def test_demo_refuses_a_remote_endpoint_without_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["demo", "--base-url", "https://api.example.invalid/v1", "--trace-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "$OPENAI_API_KEY is not set" in err
    assert "--api-key-env" in err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_demo_refuses_an_api_key_variable_that_is_not_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOA_TEST_DEMO_KEY", raising=False)
    argv = ["demo", "--base-url", "https://api.example.invalid/v1", "--api-key-env", "MOA_TEST_DEMO_KEY"]
    assert main([*argv, "--trace-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "moa-stream demo: --api-key-env MOA_TEST_DEMO_KEY: that environment variable is not set or empty\n"


def test_demo_reads_the_key_from_the_variable_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = Simulator(FAST)
    monkeypatch.setenv("MOA_TEST_DEMO_KEY", "sk-demo-key")
    with ServerThread(sim) as server:
        argv = ["demo", "--base-url", server.base_url, "--api-key-env", "MOA_TEST_DEMO_KEY", "--model", "fast-a"]
        assert main([*argv, "--trace-dir", str(tmp_path)]) == 0
    assert {headers["authorization"] for headers in sim.headers_seen} == {"Bearer sk-demo-key"}


def test_demo_refuses_a_key_without_an_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--api-key-env", "OPENAI_API_KEY"])
    assert exit_info.value.code == 2
    assert "go with --base-url" in capsys.readouterr().err


def test_demo_asks_for_a_preset_it_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--preset", "nope", "--trace-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "moa-stream demo: no preset 'nope'; the presets are: demo\n"


async def test_demo_prints_every_progress_line_before_the_answer_when_events_lag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Events reach sinks on a thread of their own; a slow one makes them lag well behind the answer.
    deliver = Progress.sink

    def lagging(self: Progress, event: Event) -> None:
        time.sleep(0.03)
        deliver(self, event)

    monkeypatch.setattr(Progress, "sink", lagging)
    out = io.StringIO()
    presets = {"fast": Preset(references=["fast-a", "fast-b"], aggregator="fast-c")}
    with ServerThread(Simulator(FAST)) as server:
        await run_demo(base_url=server.base_url, api_key="k", presets=presets, trace_dir=tmp_path, out=out)
    [trace] = moa_stream.read_traces(tmp_path / "demo.jsonl")
    text = out.getvalue()
    answer = text.index(trace.calls[-1].output.text)
    progress = [
        "reference fast-a started",
        "reference fast-b started",
        "(1/2 done)",
        "(2/2 done)",
        "aggregating 2/2 answers with fast-c",
    ]
    assert all(0 < text.index(line) < answer for line in progress), text


async def test_demo_names_the_layer_of_each_reference_in_a_layered_preset(tmp_path: Path) -> None:
    out = io.StringIO()
    presets = {"two": Preset(layers=[["fast-a", "fast-b"], ["fast-a", "fast-c"]], aggregator="fast-c")}
    with ServerThread(Simulator(FAST)) as server:
        await run_demo(base_url=server.base_url, api_key="k", presets=presets, trace_dir=tmp_path, out=out)
    lines = out.getvalue().splitlines()
    assert "  layer 1: reference fast-a started" in lines
    assert sum(line.startswith("  layer 2: reference ") and line.endswith("(2/2 done)") for line in lines) == 1
    assert sum(line.startswith("  layer 1: reference ") and line.endswith("(2/2 done)") for line in lines) == 1
    assert not any(line.startswith("  reference") for line in lines)


async def test_demo_of_one_layer_names_no_layer(tmp_path: Path) -> None:
    out = io.StringIO()
    presets = {"one": Preset(references=["fast-a", "fast-b"], aggregator="fast-c")}
    with ServerThread(Simulator(FAST)) as server:
        await run_demo(base_url=server.base_url, api_key="k", presets=presets, trace_dir=tmp_path, out=out)
    lines = out.getvalue().splitlines()
    assert "  reference fast-a started" in lines
    assert not any(line.startswith("  layer") for line in lines)
