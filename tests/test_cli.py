"""The demo, on the embedded simulator and against an OpenAI-compatible server given by URL; the
command line's help and version."""

from __future__ import annotations

import argparse
import importlib.util
import io
import socket
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

import moa_stream
from moa_stream._cli._demo import run_demo
from moa_stream._cli._text import FAULT_HELP, describe_model
from moa_stream.testing import Fault, FaultKind, SimModel, Simulator, default_simulator, sim_client

from .conftest import MODELS, ServerThread


def test_demo_command_runs_a_moa_turn_on_the_embedded_simulator(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moa_stream", "demo", "--trace-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.count("3/3 done") == 1
    assert "aggregating 3/3 answers with sim-large" in result.stdout
    table = result.stdout.split("---------")[-1]
    assert table.count("reference") == 3
    assert table.count("aggregator") == 1
    assert table.count("completed") == 4
    [trace] = moa_stream.read_traces(tmp_path / "demo.jsonl")
    assert f"1 turn traced in {tmp_path / 'demo.jsonl'}" in result.stdout
    assert trace.calls[-1].output.text in result.stdout  # the aggregator's answer was streamed


async def test_demo_against_a_server_given_by_base_url(tmp_path: Path) -> None:
    out = io.StringIO()
    with ServerThread(Simulator(MODELS)) as server:
        calls = await run_demo(
            base_url=server.base_url, api_key="k", models=["sim-small", "sim-large"], trace_dir=tmp_path, out=out
        )
    assert [(c.role, c.model) for c in calls if c.role == "aggregator"] == [("aggregator", "sim-small")]
    assert sorted(c.model for c in calls if c.role == "reference") == ["sim-large", "sim-small"]
    assert all(c.provider == "127.0.0.1" for c in calls)
    assert (tmp_path / "demo.jsonl").exists()


async def test_demo_runs_a_preset_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "moa.toml"
    config.write_text(
        '[presets.first]\nreferences = ["sim-small"]\naggregator = "sim-small"\n'
        '[presets.pair]\nreferences = ["sim-small", "sim-large"]\naggregator = "sim-large"\nquorum = 1\n'
    )
    with ServerThread(Simulator(MODELS)) as server:
        calls = await run_demo(
            base_url=server.base_url, api_key="k", config=config, preset="pair", trace_dir=tmp_path, out=io.StringIO()
        )
    assert sorted((c.role, c.model) for c in calls)[0] == ("aggregator", "sim-large")
    assert len(calls) == 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sim_command_serves_the_simulator_over_http() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moa_stream", "sim", "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stderr is not None
        assert f"http://127.0.0.1:{port}/v1" in server.stderr.readline()  # printed once it is listening
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0) as client:
            reply = client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "sim-small"
        assert reply.usage is not None
    finally:
        server.terminate()
        server.wait(10)


def test_events_held_at_interpreter_exit_are_delivered(tmp_path: Path) -> None:
    # The client is never closed: the exit hook still drains the trace line.
    script = """
import asyncio, sys, moa_stream
from moa_stream.testing import sim_client

async def main():
    client = moa_stream.wrap(sim_client(), trace_dir=sys.argv[1])
    with moa_stream.session("exit"):
        await client.chat.completions.create(model="sim-fast", messages=[{"role": "user", "content": "hi"}])

asyncio.run(main())
"""
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    [trace] = moa_stream.read_traces(tmp_path / "exit.jsonl")
    assert trace.end.status == "completed"


def test_traces_command_is_wired_into_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moa_stream._cli import main

    assert main(["traces", "stats", str(tmp_path)]) == 1  # no trace files: bad input, said clearly
    assert "jsonl" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="the `local` extra is installed here")
def test_local_commands_say_how_to_install_the_missing_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moa_stream._cli import main

    assert main(["local", "serve"]) == 2
    assert "scripts/local" in capsys.readouterr().err
    assert main(["demo", "--local", "--trace-dir", str(tmp_path)]) == 2
    assert "moa-stream[local]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_demo_local_refuses_an_upstream_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    from moa_stream._cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--local", "--base-url", "http://127.0.0.1:1/v1"])
    assert exit_info.value.code == 2
    assert "--local brings its own server" in capsys.readouterr().err


def test_demo_refuses_a_preset_whose_key_variable_is_not_set(tmp_path: Path) -> None:
    config = tmp_path / "moa.toml"
    config.write_text(
        '[presets.p]\nreferences = [{ model = "m", base_url = "http://127.0.0.1:9/v1", '
        'api_key_env = "MOA_TEST_NO_SUCH_KEY" }]\naggregator = "m"\n'
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "MOA_TEST_NO_SUCH_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "moa_stream", "demo", "--config", str(config), "--trace-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "environment variable MOA_TEST_NO_SUCH_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_demo_command_runs_its_turn_through_the_api_asked_for(tmp_path: Path, api: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moa_stream", "demo", "--api", api, "--trace-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.count("3/3 done") == 1
    assert "aggregating 3/3 answers with sim-large" in result.stdout
    assert ("through the Responses API" in result.stdout) is (api == "responses")
    [trace] = moa_stream.read_traces(tmp_path / "demo.jsonl")
    assert f"1 turn traced in {tmp_path / 'demo.jsonl'}" in result.stdout
    *references, aggregator = trace.calls
    assert aggregator.role == "aggregator"
    assert aggregator.api == api  # the aggregator speaks the caller's API
    assert [reference.api for reference in references] == ["chat"] * 3
    assert aggregator.output.text
    assert aggregator.output.text in result.stdout  # the answer was streamed
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("role "))
    rows = [line.split() for line in lines[header + 2 : lines.index("", header)]]  # the header, dashes, a row a call
    assert sorted((row[0], row[1], row[-1]) for row in rows) == sorted(
        (call.role, call.model, "completed") for call in trace.calls
    )


def test_demo_help_says_what_each_api_does(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from moa_stream._cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # no name broken across lines, whatever the terminal

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--api {chat,responses}" in help_text
    assert "client.chat.completions.create" in help_text
    assert "client.responses.create" in help_text
    assert "default: chat" in help_text


# -- help and version -------------------------------------------------------------------------------


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from moa_stream._cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"moa-stream {moa_stream.__version__}\n"


def _commands(
    parser: argparse.ArgumentParser, name: str = "moa-stream"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _commands(sub, f"{name} {command}")


def test_every_command_has_a_description_and_shows_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from moa_stream._cli._main import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # no line, or option name, broken across lines

    commands = dict(_commands(build_parser()))
    assert {"moa-stream demo", "moa-stream sim", "moa-stream serve", "moa-stream bench"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, name
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
                continue
            shown = str(action.default.__name__ if callable(action.default) else action.default)
            help_text = " ".join((action.help or "").split())
            assert "default" in help_text or f"{help_text} (default: {shown})" in text, (name, action.dest)


def test_sim_help_lists_the_default_models_and_every_fault(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moa_stream._cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # no name broken across lines, whatever the terminal

    with pytest.raises(SystemExit):
        main(["sim", "--help"])
    text = capsys.readouterr().out
    for model in default_simulator().models:
        assert f"  {model.name}  " in text
    assert "sim-large     first token after 0.6 s" in text
    assert "x-sim-fault: KIND[;after=N][;stall=S]" in text
    for kind in typing.get_args(FaultKind):
        assert f"\n  {kind} " in text, kind
    assert "--port PORT port to bind; 0 takes any free one (default: 8000)" in " ".join(text.split())


def test_sim_help_describes_every_fault_kind_and_no_other() -> None:
    assert set(FAULT_HELP) == set(typing.get_args(FaultKind))


def test_sim_help_says_what_a_model_does() -> None:
    slow = SimModel(name="slow", ttft_s=0.25, tokens_per_s=10, reply_tokens=5, reasoning_tokens=2, jitter=0.5)
    assert describe_model(slow) == (
        "first token after 0.25 s (times a lognormal of sigma 0.5, seeded by the request), 10 tokens/s, "
        "5 words unless the request's token limit is lower, 2 words of reasoning first (reasoning_content; "
        "Responses: a summary)"
    )
    assert describe_model(SimModel(name="bad", fault=Fault(kind="http_500"))).endswith(
        "fault http_500 on every request"
    )


async def test_the_fault_header_works_as_sim_help_says() -> None:
    client = sim_client(default_simulator(), max_retries=0)
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    async with client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="sim-small", messages=hi, extra_headers={"x-sim-fault": "http_429"}
            )
        with pytest.raises(openai.BadRequestError, match="x-sim-fault"):  # an unknown kind is a 400
            await client.chat.completions.create(model="sim-small", messages=hi, extra_headers={"x-sim-fault": "nope"})
        stream = await client.chat.completions.create(
            model="sim-small", messages=hi, stream=True, extra_headers={"x-sim-fault": "stream_error;after=2"}
        )
        seen = 0
        with pytest.raises(openai.APIError):
            async for _ in stream:
                seen += 1
        assert seen == 2


def test_sim_on_a_port_in_use_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from moa_stream._cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["sim", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"moa-stream sim: cannot listen on 127.0.0.1:{port}: ")
    assert "--port 0 takes a free one" in err
    assert "Traceback" not in err
