"""`moa-stream serve`: an OpenAI-compatible endpoint in front of one wrapped client, on real loopback HTTP."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import moa_stream
from moa_stream import Preset
from moa_stream._sdk import default_http_module
from moa_stream.testing import Fault, SimModel, Simulator, sim_client

from .conftest import MODELS, EventLog

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from moa_stream._server import (
    DEFAULT_MAX_BODY_BYTES,
    Server,
    add_serve_parser,
    create_app,
    run_serve,
)

USER = [{"role": "user", "content": "Tell me about streams"}]
CHAT = {"model": "sim-small", "messages": USER}
TOKEN = "sk-serve-sentinel-9c1e"
# Unknown names answer instantly on the simulator, and are told apart in events.
PRESETS = {"duo": Preset(references=["m1", "m2"], aggregator="m3")}

Serve = Callable[..., AbstractAsyncContextManager[Server]]


@pytest.fixture
def sim() -> Simulator:
    return Simulator(
        [
            *MODELS,
            # Long enough that a stream is still going when a test acts on it (10 s at full length).
            SimModel(name="sim-long", tokens_per_s=500.0, reply_tokens=5000),
            SimModel(name="sim-limited", fault=Fault(kind="http_429")),
        ]
    )


@pytest.fixture
def serve(sim: Simulator, log: EventLog, tmp_path: Path) -> Serve:
    """`async with serve(**create_app_options) as server:` the app around a wrapped in-process
    simulator client (sink: `log`, traces in tmp_path/traces) on a free loopback port. Leaving the
    block shuts the server down, which closes the client and so drains every event and trace line."""

    @contextlib.asynccontextmanager
    async def serving(**options: Any) -> AsyncIterator[Server]:
        client = moa_stream.wrap(
            sim_client(sim, max_retries=0), presets=PRESETS, sinks=[log], trace_dir=tmp_path / "traces"
        )
        async with Server(create_app(client, **options), port=0, graceful_timeout=5) as server:
            yield server

    return serving


def caller(server: Server, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=api_key, max_retries=0)


def raw(server: Server) -> Any:
    """A plain HTTP client (httpx or httpx2, whichever the SDK uses) for requests no SDK would send."""
    return default_http_module().AsyncClient(base_url=server.base_url, timeout=10)


def assert_openai_error(response: Any, status: int, *, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    return error


# -- pass-through ---------------------------------------------------------------------------------


async def test_streamed_chat_reaches_the_caller_as_the_upstream_sent_it(
    serve: Serve, sim: Simulator, log: EventLog
) -> None:
    async with serve() as server, caller(server) as client:
        stream = await client.chat.completions.create(model="sim-large", messages=USER, stream=True)
        served = [chunk.model_dump() async for chunk in stream]
    async with sim_client(sim) as bare:
        stream = await bare.chat.completions.create(model="sim-large", messages=USER, stream=True)
        direct = [chunk.model_dump() async for chunk in stream]
    assert served == direct
    [call] = log.of(moa_stream.CallUsage)
    assert (call.role, call.model, call.status) == ("direct", "sim-large", "completed")
    assert call.output_tokens == 40


async def test_non_streamed_chat_reaches_the_caller_as_the_upstream_sent_it(
    serve: Serve, sim: Simulator, log: EventLog
) -> None:
    async with serve() as server, caller(server) as client:
        served = await client.chat.completions.create(**CHAT)
    async with sim_client(sim) as bare:
        direct = await bare.chat.completions.create(**CHAT)
    assert served.model_dump() == direct.model_dump()
    [call] = log.of(moa_stream.CallUsage)
    assert (call.role, call.status, call.usage_source) == ("direct", "completed", "reported")


async def test_streamed_preset_runs_a_moa_turn(serve: Serve, log: EventLog) -> None:
    async with serve() as server, caller(server) as client:
        stream = await client.chat.completions.create(model="moa:duo", messages=USER, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    calls = log.of(moa_stream.CallUsage)
    assert sorted((c.role, c.model, c.status) for c in calls) == [
        ("aggregator", "m3", "completed"),
        ("reference", "m1", "completed"),
        ("reference", "m2", "completed"),
    ]
    [end] = log.of(moa_stream.TurnEnd)
    assert (end.model, end.calls, end.status) == ("moa:duo", 3, "completed")
    [trace] = log.of(moa_stream.TurnTrace)
    assert text
    assert trace.calls[-1].output.text == text


async def test_models_lists_the_presets_then_the_upstreams_models(serve: Serve) -> None:
    async with serve() as server, caller(server) as client:
        ids = [model.id async for model in client.models.list()]
    assert ids[0] == "moa:duo"
    assert {"sim-small", "sim-large", "sim-long"} <= set(ids[1:])


def root(server: Server) -> str:
    return server.base_url.removesuffix("/v1")


async def test_health_answers_ok_with_the_version_and_no_token(serve: Serve, sim: Simulator, log: EventLog) -> None:
    async with serve(token=TOKEN) as server, raw(server) as http:
        response = await http.get(f"{root(server)}/health")
        refused = await http.get("models")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ok", "version": moa_stream.__version__, "store": "memory"}
    assert refused.status_code == 401  # the token is still needed everywhere else
    assert sim.stats.requests == 0  # nothing went upstream
    assert log.events == []


async def test_health_says_the_store_is_shared_without_asking_it(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    # Nothing listens on port 9: an answer proves that /health never waits on the store.
    client = moa_stream.wrap(sim_client(max_retries=0), presets=PRESETS, store="redis://127.0.0.1:9/0")
    async with Server(create_app(client), port=0, graceful_timeout=5) as server, raw(server) as http:
        response = await http.get(f"{root(server)}/health")
    assert response.json() == {"status": "ok", "version": moa_stream.__version__, "store": "shared"}


def test_serve_help_documents_the_health_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="moa-stream")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert 'GET /health answers 200 {"status": "ok", "version":' in text
    assert "no token needed" in text


async def test_session_header_reaches_the_library(serve: Serve, log: EventLog, tmp_path: Path) -> None:
    async with serve() as server, caller(server) as client:
        await client.chat.completions.create(**CHAT, extra_headers={"X-MoA-Session": "team-a"})
    [call] = log.of(moa_stream.CallUsage)
    assert call.session_id == "team-a"
    assert len(list(moa_stream.read_traces(tmp_path / "traces" / "team-a.jsonl"))) == 1


async def test_upstream_error_comes_back_with_its_status_and_body(serve: Serve, log: EventLog) -> None:
    async with serve() as server, raw(server) as http:
        response = await http.post("chat/completions", json=CHAT | {"model": "sim-limited"})
    assert response.status_code == 429
    assert response.json() == {
        "error": {
            "message": "Rate limit reached for requests (simulated).",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert response.headers["retry-after"] == "0"
    assert response.headers["x-request-id"].startswith("sim-req-")
    [call] = log.of(moa_stream.CallUsage)
    assert (call.status, call.http_status) == ("error", 429)


async def test_upstream_error_echoing_the_servers_key_reaches_the_remote_caller_without_it(log: EventLog) -> None:
    key = "sk-server-upstream-4b7e21"
    sim = Simulator([SimModel(name="echo", fault=Fault(kind="echo_key"))])
    client = moa_stream.wrap(sim_client(sim, max_retries=0, api_key=key), sinks=[log])
    async with Server(create_app(client), port=0, graceful_timeout=5) as server, raw(server) as http:
        response = await http.post("chat/completions", json=CHAT | {"model": "echo"})
    error = assert_openai_error(response, 401)
    assert key not in response.text
    assert "[REDACTED]" in error["message"]
    assert key in sim.headers_seen[0]["authorization"]  # it was sent, and echoed


async def test_unknown_preset_is_the_librarys_404(serve: Serve, log: EventLog) -> None:
    async with serve() as server, raw(server) as http:
        response = await http.post("chat/completions", json=CHAT | {"model": "moa:nope"})
    error = assert_openai_error(response, 404, param="model")
    assert error["code"] == "model_not_found"
    assert "moa:duo" in error["message"]
    assert log.of(moa_stream.CallUsage) == []  # refused before any upstream call


# -- what the server refuses ----------------------------------------------------------------------


async def test_malformed_json_is_a_400_in_openai_shape(serve: Serve, log: EventLog) -> None:
    async with serve() as server, raw(server) as http:
        response = await http.post(
            "chat/completions",
            content=b'{"model": "sim-small", "messages": [',
            headers={"content-type": "application/json"},
        )
    error = assert_openai_error(response, 400)
    assert "not valid JSON" in error["message"]
    assert log.of(moa_stream.CallUsage) == []


async def test_invalid_utf8_inside_a_json_string_is_a_400_in_openai_shape(serve: Serve, log: EventLog) -> None:
    async with serve() as server, raw(server) as http:
        response = await http.post(
            "chat/completions",
            content=b'{"model": "sim-small", "messages": [{"role": "user", "content": "caf\xc3"}]}',
            headers={"content-type": "application/json"},
        )
    error = assert_openai_error(response, 400)
    assert "UTF-8" in error["message"]
    assert log.of(moa_stream.CallUsage) == []


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ([CHAT], None, "JSON object"),
        ({"messages": USER}, "model", "model"),
        ({"model": 7, "messages": USER}, "model", "model"),
        ({"model": "sim-small"}, "messages", "messages"),
        ({"model": "sim-small", "messages": "hi"}, "messages", "messages"),
    ],
)
async def test_body_that_is_no_chat_request_is_a_400_naming_the_problem(
    serve: Serve, log: EventLog, body: object, param: str | None, says: str
) -> None:
    async with serve() as server, raw(server) as http:
        response = await http.post("chat/completions", json=body)
    error = assert_openai_error(response, 400, param=param)
    assert says in error["message"]
    assert log.of(moa_stream.CallUsage) == []


async def test_body_declared_over_the_limit_is_a_413(serve: Serve, log: EventLog) -> None:
    big = CHAT | {"messages": [{"role": "user", "content": "x" * 2048}]}
    async with serve(max_body_bytes=1024) as server, raw(server) as http:
        response = await http.post("chat/completions", json=big)
    error = assert_openai_error(response, 413)
    assert "1024 bytes" in error["message"]
    assert log.of(moa_stream.CallUsage) == []


async def test_body_sent_without_a_length_is_cut_off_at_the_limit(serve: Serve, log: EventLog) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # chunked transfer encoding: no Content-Length to trust
        yield b'{"model": "sim-small", "messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"x" * 64
        yield b'"}]}'

    async with serve(max_body_bytes=1024) as server, raw(server) as http:
        response = await http.post("chat/completions", content=chunks())
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413)
    assert log.of(moa_stream.CallUsage) == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer sk-wrong"}, {"authorization": f"Basic {TOKEN}"}, {"authorization": "Bearer"}],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
async def test_request_without_the_bearer_token_is_a_401(serve: Serve, log: EventLog, headers: dict[str, str]) -> None:
    async with serve(token=TOKEN) as server, raw(server) as http:
        chat = await http.post("chat/completions", json=CHAT, headers=headers)
        models = await http.get("models", headers=headers)
    for response in (chat, models):
        error = assert_openai_error(response, 401)
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in response.text
    assert log.of(moa_stream.CallUsage) == []


async def test_request_with_the_bearer_token_is_served(serve: Serve, log: EventLog, tmp_path: Path) -> None:
    async with serve(token=TOKEN) as server, caller(server, api_key=TOKEN) as client:
        completion = await client.chat.completions.create(**CHAT, extra_headers={"X-MoA-Session": "authed"})
    assert completion.choices[0].message.content
    [call] = log.of(moa_stream.CallUsage)
    assert call.status == "completed"
    assert TOKEN not in repr(log.events)
    assert TOKEN not in (tmp_path / "traces" / "authed.jsonl").read_text()


async def test_requests_over_the_per_client_limit_are_a_429_with_retry_after(serve: Serve) -> None:
    async with serve(max_concurrent_per_client=1) as server, raw(server) as http:
        long = CHAT | {"model": "sim-long", "stream": True}
        async with http.stream("POST", "chat/completions", json=long) as first:
            assert first.status_code == 200
            chunks = first.aiter_bytes()  # kept: a collected iterator would close the response
            await anext(chunks)  # the first request holds its slot while it streams
            second = await http.post("chat/completions", json=CHAT)
    error = assert_openai_error(second, 429)
    assert error["code"] == "rate_limit_exceeded"
    assert second.headers["retry-after"] == "1"


async def test_client_leaving_mid_stream_closes_the_upstream_stream(
    serve: Serve, sim: Simulator, log: EventLog
) -> None:
    async with serve() as server, raw(server) as http:
        async with http.stream("POST", "chat/completions", json=CHAT | {"model": "sim-long", "stream": True}) as resp:
            chunks = resp.aiter_bytes()
            await anext(chunks)
        # Closed half-read, the connection is dropped rather than pooled: the server sees its client leave.
        await log.wait_turns(1)
        [call] = log.of(moa_stream.CallUsage)
        assert call.status == "closed_early"
        assert 0 < (call.output_tokens or 0) < 5000
        with anyio.fail_after(5):
            await sim.wait_idle()  # no upstream response left open
        assert sim.stats.open_streams == 0


# -- shutdown and the command ---------------------------------------------------------------------


async def test_shutdown_drains_every_turn_into_the_trace_file(serve: Serve, tmp_path: Path) -> None:
    async with serve() as server, caller(server) as client:
        for _ in range(3):
            await client.chat.completions.create(**CHAT, extra_headers={"X-MoA-Session": "drain"})
        stream = await client.chat.completions.create(
            model="moa:duo", messages=USER, stream=True, extra_headers={"X-MoA-Session": "drain"}
        )
        async for _ in stream:
            pass
    # No flush and no waiting: leaving the server ran the app's shutdown, which closed the client.
    traces = list(moa_stream.read_traces(tmp_path / "traces" / "drain.jsonl"))
    assert [trace.model for trace in traces].count("sim-small") == 3
    assert [trace.model for trace in traces].count("moa:duo") == 1


def test_app_needs_a_wrapped_client() -> None:
    with pytest.raises(ValueError, match=r"moa_stream\.wrap\(\)"):
        create_app(openai.AsyncOpenAI(api_key="unused"))


def test_serve_binds_loopback_by_default() -> None:
    parser = argparse.ArgumentParser(prog="moa-stream")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8080)
    assert args.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 1024 * 1024
    assert (args.token_env, args.base_url, args.trace_dir) == (None, None, None)
    assert Server(object()).host == "127.0.0.1"


def test_serve_refuses_a_token_variable_that_is_not_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MOA_TEST_NO_SUCH_TOKEN", raising=False)
    parser = argparse.ArgumentParser(prog="moa-stream")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    assert run_serve(parser.parse_args(["serve", "--token-env", "MOA_TEST_NO_SUCH_TOKEN"])) == 2
    assert "--token-env MOA_TEST_NO_SUCH_TOKEN" in capsys.readouterr().err


def test_serve_refuses_a_preset_whose_key_variable_is_not_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("MOA_TEST_NO_SUCH_KEY", raising=False)
    config = tmp_path / "moa.toml"
    config.write_text(
        '[presets.p]\nreferences = [{ model = "m", base_url = "http://127.0.0.1:9/v1", '
        'api_key_env = "MOA_TEST_NO_SUCH_KEY" }]\naggregator = "m"\n'
    )
    parser = argparse.ArgumentParser(prog="moa-stream")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    assert run_serve(parser.parse_args(["serve", "--config", str(config)])) == 2
    err = capsys.readouterr().err
    assert "MOA_TEST_NO_SUCH_KEY" in err
    assert "is not set" in err


_SERVE_MAIN = """
import argparse, sys
from moa_stream._server import add_serve_parser, run_serve
parser = argparse.ArgumentParser(prog="moa-stream")
add_serve_parser(parser.add_subparsers(dest="command", required=True))
sys.exit(run_serve(parser.parse_args(sys.argv[1:])))
"""


async def test_serve_command_serves_until_sigint_then_drains_traces(tmp_path: Path) -> None:
    config = tmp_path / "moa.toml"
    config.write_text('[presets.pair]\nreferences = ["m1", "m2"]\naggregator = "m3"\n')
    command = [sys.executable, "-c", _SERVE_MAIN, "serve", "--port", "0", "--config", str(config)]
    command += ["--token-env", "MOA_TEST_TOKEN", "--trace-dir", str(tmp_path / "traces")]
    env = os.environ | {"MOA_TEST_TOKEN": TOKEN}
    async with await anyio.open_process(command, env=env, stdout=subprocess.DEVNULL) as process:
        assert process.stderr is not None
        stderr = BufferedByteReceiveStream(process.stderr)
        with anyio.fail_after(15):
            banner = ""
            while not banner.startswith("moa-stream serving on "):
                banner = (await stderr.receive_until(b"\n", 65536)).decode()
        assert "presets: moa:pair" in banner
        async with openai.AsyncOpenAI(base_url=banner.split()[3], api_key=TOKEN, max_retries=0) as client:
            ids = [model.id async for model in client.models.list()]
            stream = await client.chat.completions.create(
                model="moa:pair", messages=USER, stream=True, extra_headers={"X-MoA-Session": "cli"}
            )
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(15):
            assert await process.wait() == 0
            rest = b"".join([chunk async for chunk in stderr]).decode()
    assert ids[0] == "moa:pair"
    [trace] = list(moa_stream.read_traces(tmp_path / "traces" / "cli.jsonl"))
    assert trace.calls[-1].output.text == text
    assert TOKEN not in banner + rest


async def test_a_budget_refusal_reaches_a_remote_caller_as_an_openai_error(sim: Simulator, log: EventLog) -> None:
    budget = moa_stream.Budget(session=moa_stream.Limits(calls=1))
    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[log], budget=budget)
    async with Server(create_app(client), port=0, graceful_timeout=5) as server, caller(server) as remote:
        headers = {moa_stream.SESSION_HEADER: "remote-user"}
        await remote.chat.completions.create(model="sim-small", messages=USER, extra_headers=headers)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as refused:
            await remote.chat.completions.create(model="sim-small", messages=USER, extra_headers=headers)  # type: ignore[arg-type]
    assert refused.value.code == "budget_exceeded"
    assert isinstance(refused.value.body, dict)
    assert (refused.value.body["limit"], refused.value.body["session_id"]) == ("calls", "remote-user")
    assert sim.stats.requests == 1


# -- the Responses API ----------------------------------------------------------------------------

QUESTION = "Name three rivers please"
RESPONSE = {"model": "sim-large", "input": QUESTION}


async def response_bytes(client: openai.AsyncOpenAI, **request: Any) -> bytes:
    """The body of a Responses create as it reached `client`, streamed or not."""
    async with client.responses.with_streaming_response.create(**request) as response:
        return b"".join([part async for part in response.iter_bytes()])


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_response_reaches_the_caller_as_the_upstream_sent_it(
    serve: Serve, sim: Simulator, log: EventLog, stream: bool
) -> None:
    async with serve() as server, caller(server) as client:
        served = await response_bytes(client, **RESPONSE, stream=stream)
    async with sim_client(sim) as bare:
        direct = await response_bytes(bare, **RESPONSE, stream=stream)
    assert served == direct
    assert (b"event: response.completed" in served) is stream
    [call] = log.of(moa_stream.CallUsage)
    assert (call.api, call.role, call.model, call.status) == ("responses", "direct", "sim-large", "completed")
    assert (call.usage_source, call.output_tokens) == ("reported", 40)


async def test_a_preset_through_the_responses_api_runs_a_moa_turn(serve: Serve, log: EventLog) -> None:
    async with serve() as server, caller(server) as client:
        stream = await client.responses.create(model="moa:duo", input=QUESTION, stream=True)
        text = "".join([event.delta async for event in stream if event.type == "response.output_text.delta"])
        # Another question: the same one would have its references from the preset's cache.
        async with client.responses.stream(model="moa:duo", input="And three lakes?") as helper:
            final = await helper.get_final_response()
    turn = [
        ("aggregator", "m3", "responses", "completed"),
        ("reference", "m1", "chat", "completed"),
        ("reference", "m2", "chat", "completed"),
    ]
    assert sorted((c.role, c.model, c.api, c.status) for c in log.of(moa_stream.CallUsage)) == sorted(2 * turn)
    ends = log.of(moa_stream.TurnEnd)
    assert [(end.model, end.calls, end.status) for end in ends] == 2 * [("moa:duo", 3, "completed")]
    first, second = log.of(moa_stream.TurnTrace)
    assert text
    assert first.calls[-1].output.text == text
    assert final.status == "completed"
    assert final.output_text == second.calls[-1].output.text


async def test_a_background_response_is_metered_once_when_a_retrieve_through_the_server_sees_it_finished(
    serve: Serve, log: EventLog
) -> None:
    async with serve() as server, caller(server) as client:
        created = await client.responses.create(model="sim-slow", input=QUESTION, background=True)
        assert created.status == "queued"
        seen = created
        while seen.status in ("queued", "in_progress"):
            await anyio.sleep(0.05)
            seen = await client.responses.retrieve(created.id)
        again = await client.responses.retrieve(created.id)  # a second look meters nothing more
    assert again.id == seen.id == created.id
    assert seen.status == "completed"
    [call] = log.of(moa_stream.CallUsage)
    assert (call.api, call.status, call.usage_source) == ("responses", "completed", "reported")
    assert call.output_tokens == seen.usage.output_tokens  # type: ignore[union-attr]
    [trace] = log.of(moa_stream.TurnTrace)
    assert trace.calls[0].output.text == seen.output_text


async def test_a_background_response_streamed_again_through_the_server_is_metered_once(
    serve: Serve, log: EventLog
) -> None:
    async with serve() as server, caller(server) as client:
        created = await client.responses.create(model="sim-slow", input=QUESTION, background=True)
        # ?stream=true reaches the upstream: the events come again, as SSE
        stream = await client.responses.retrieve(created.id, stream=True)
        events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    [call] = log.of(moa_stream.CallUsage)
    assert (call.api, call.status, call.usage_source) == ("responses", "completed", "reported")
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert log.of(moa_stream.TurnTrace)[0].calls[0].output.text == text


async def test_a_background_response_cancelled_through_the_server_is_metered_as_cancelled(
    serve: Serve, log: EventLog
) -> None:
    async with serve() as server, caller(server) as client:
        created = await client.responses.create(model="sim-long", input=QUESTION, background=True)
        cancelled = await client.responses.cancel(created.id)
    assert (cancelled.id, cancelled.status) == (created.id, "cancelled")
    [call] = log.of(moa_stream.CallUsage)
    assert (call.api, call.status) == ("responses", "cancelled")


async def test_a_follow_up_without_input_goes_upstream(serve: Serve, log: EventLog) -> None:
    async with serve() as server, caller(server) as client:
        first = await client.responses.create(**RESPONSE)  # type: ignore[call-overload]
        second = await client.responses.create(model="sim-large", previous_response_id=first.id)
    assert second.status == "completed"
    assert [call.status for call in log.of(moa_stream.CallUsage)] == ["completed", "completed"]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ([RESPONSE], None, "JSON object"),
        ({"model": "", "input": QUESTION}, "model", "model"),
        ({"model": ["sim-small"], "input": QUESTION}, "model", "model"),
    ],
)
async def test_body_that_is_no_responses_request_is_a_400_naming_the_problem(
    serve: Serve, log: EventLog, body: object, param: str | None, says: str
) -> None:
    async with serve() as server, raw(server) as http:
        response = await http.post("responses", json=body)
        malformed = await http.post("responses", content=b'{"model": "sim-small", "input": ')
    error = assert_openai_error(response, 400, param=param)
    assert says in error["message"]
    assert "not valid JSON" in assert_openai_error(malformed, 400)["message"]
    assert log.of(moa_stream.CallUsage) == []


@pytest.mark.parametrize("body", [{"model": "sim-small"}, {"input": QUESTION}], ids=["no-input", "no-model"])
async def test_a_create_the_upstream_must_judge_gets_the_upstreams_answer(
    serve: Serve, sim: Simulator, log: EventLog, body: dict[str, Any]
) -> None:
    # Every field of a Responses create is optional to the API (a stored prompt may name the model, a
    # conversation carry the input): the relay refuses none of it and relays what the upstream says.
    async with serve() as server, caller(server) as client:
        with pytest.raises(openai.BadRequestError) as served:
            await client.responses.create(**body)
    async with sim_client(sim, max_retries=0) as bare:
        with pytest.raises(openai.BadRequestError) as direct:
            await bare.responses.create(**body)
    assert served.value.body == direct.value.body
    assert served.value.body["param"] in {"input", "model"}  # type: ignore[index]
    [call] = log.of(moa_stream.CallUsage)
    assert (call.api, call.status) == ("responses", "error")


async def test_looks_at_stored_responses_relay_the_upstreams_answer(
    serve: Serve, sim: Simulator, log: EventLog
) -> None:
    async with serve() as server, caller(server) as client:
        served = [await missing(client.responses.retrieve(id_)) for id_ in ("resp_nope", "resp nope")]
        served.append(await missing(client.responses.cancel("resp_nope")))
    async with sim_client(sim, max_retries=0) as bare:
        direct = [await missing(bare.responses.retrieve(id_)) for id_ in ("resp_nope", "resp nope")]
        direct.append(await missing(bare.responses.cancel("resp_nope")))
    assert served == direct  # the id goes upstream escaped as the SDK escapes it
    assert "'resp_nope'" in str(served[0])
    assert log.of(moa_stream.CallUsage) == []


async def missing(look: Awaitable[object]) -> object:
    """The error body of a look at a response that is not there."""
    with pytest.raises(openai.NotFoundError) as error:
        await look
    return error.value.body


@pytest.mark.parametrize("path", ["/v1/responses/..", "/v1/responses/../cancel", "/v1/responses/."])
async def test_a_dot_segment_for_a_response_id_is_a_404(serve: Serve, sim: Simulator, path: str) -> None:
    # An HTTP client resolves the dots away (here, and on the way upstream): only a raw request has them.
    method = "POST" if path.endswith("/cancel") else "GET"
    async with serve() as server, await anyio.connect_tcp(server.host, server.port) as connection:
        request = f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        await connection.send(request.encode())
        answer = b"".join([chunk async for chunk in connection])
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert b"not found" in answer
    assert b"invalid_request_error" in answer  # OpenAI's shape, not Starlette's
    assert sim.stats.requests == 0


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer sk-wrong"}],
    ids=["missing", "wrong"],
)
async def test_the_responses_routes_need_the_bearer_token(
    serve: Serve, sim: Simulator, log: EventLog, headers: dict[str, str]
) -> None:
    async with serve(token=TOKEN) as server:
        async with raw(server) as http:
            refused = [
                await http.post("responses", json=RESPONSE, headers=headers),
                await http.get("responses/resp_x", headers=headers),
                await http.post("responses/resp_x/cancel", headers=headers),
            ]
        assert sim.stats.requests == 0
        async with caller(server, api_key=TOKEN) as client:
            created = await client.responses.create(model="sim-long", input=QUESTION, background=True)
            seen = await client.responses.retrieve(created.id)
            cancelled = await client.responses.cancel(created.id)
    for response in refused:
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert seen.id == cancelled.id == created.id
    assert cancelled.status == "cancelled"
    [call] = log.of(moa_stream.CallUsage)
    assert (call.api, call.status) == ("responses", "cancelled")


async def test_upstream_error_on_a_response_reaches_the_remote_caller_without_the_servers_key(log: EventLog) -> None:
    key = "sk-server-upstream-4b7e21"
    sim = Simulator([SimModel(name="echo", fault=Fault(kind="echo_key"))])
    client = moa_stream.wrap(sim_client(sim, max_retries=0, api_key=key), sinks=[log])
    async with Server(create_app(client), port=0, graceful_timeout=5) as server, raw(server) as http:
        response = await http.post("responses", json={"model": "echo", "input": QUESTION})
    error = assert_openai_error(response, 401)
    assert key not in response.text
    assert "[REDACTED]" in error["message"]
    [call] = log.of(moa_stream.CallUsage)
    assert (call.api, call.status, call.http_status) == ("responses", "error", 401)


async def test_client_leaving_a_response_stream_mid_way_closes_the_upstream_stream(
    serve: Serve, sim: Simulator, log: EventLog
) -> None:
    async with serve() as server, raw(server) as http:
        long = {"model": "sim-long", "input": QUESTION, "stream": True}
        async with http.stream("POST", "responses", json=long) as response:
            chunks = response.aiter_bytes()
            await anext(chunks)
        await log.wait_turns(1)
        [call] = log.of(moa_stream.CallUsage)
        assert (call.api, call.status) == ("responses", "closed_early")
        with anyio.fail_after(5):
            await sim.wait_idle()
        assert sim.stats.open_streams == 0
