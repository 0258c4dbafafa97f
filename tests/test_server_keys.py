"""`moa-stream serve --keys`: who may spend what, each key in sessions of its own, on real loopback HTTP."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import moa_stream
from moa_stream._errors import ConfigError
from moa_stream._sdk import default_http_module
from moa_stream._wrap import _engine_of
from moa_stream.testing import SimModel, Simulator, sim_client

from .conftest import MODELS, EventLog

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from moa_stream._server import KeyRing, Server, add_serve_parser, create_app, read_keys, run_serve, token_digest

USER = [{"role": "user", "content": "Tell me about streams"}]
CHAT = {"model": "sim-small", "messages": USER}
ALICE = "sk-alice-sentinel-7f3a"
BOB = "sk-bob-sentinel-1c9e"


def key_table(key_id: str, token: str, budget: str = "") -> str:
    table = f'[keys.{key_id}]\nsha256 = "{token_digest(token)}"\n'
    return table + (f"[keys.{key_id}.budget]\n{budget}\n" if budget else "")


def write_keys(path: Path, *tables: str) -> Path:
    # Replaced whole, as an editor or a deploy would: a reload never reads half a file.
    draft = path.with_suffix(".draft")
    draft.write_text("\n".join(tables))
    os.replace(draft, path)
    return path


@pytest.fixture
def sim() -> Simulator:
    # Long enough that a stream is still going when a test acts on it.
    return Simulator([*MODELS, SimModel(name="sim-long", tokens_per_s=500.0, reply_tokens=5000)])


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return write_keys(tmp_path / "keys.toml", key_table("alice", ALICE), key_table("bob", BOB))


@contextlib.asynccontextmanager
async def serving(
    sim: Simulator, log: EventLog, tmp_path: Path, keys: KeyRing, **options: Any
) -> AsyncIterator[tuple[Server, openai.AsyncOpenAI]]:
    """The app with `keys` around a wrapped simulator client (sink `log`, traces in tmp_path/traces)
    on a free loopback port; yields the server and the wrapped client."""
    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[log], trace_dir=tmp_path / "traces")
    async with Server(create_app(client, keys=keys, **options), port=0, graceful_timeout=5) as server:
        yield server, client


def caller(server: Server, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=token, max_retries=0)


def raw(server: Server) -> Any:
    return default_http_module().AsyncClient(base_url=server.base_url, timeout=10)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- the keys file ----------------------------------------------------------------------------------

DIGEST = token_digest(ALICE)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[keys.alice\n", ["invalid TOML"]),
        ('title = "x"\n', ["top-level key 'title'"]),
        ("", ["'keys' must be a table"]),
        ('[keys."al.ice"]\nsha256 = "' + DIGEST + '"\n', ["key 'al.ice'", "1 to 64"]),
        ('[keys."' + "a" * 65 + '"]\nsha256 = "' + DIGEST + '"\n', ["key 'aaaa", "1 to 64"]),
        ("[keys.alice]\n", ["key 'alice'", "field 'sha256'", "missing", "--hash-token"]),
        ("[keys.alice]\nsha256 = 42\n", ["key 'alice'", "field 'sha256'", "expected a string"]),
        ('[keys.alice]\nsha265 = "' + DIGEST + '"\n', ["key 'alice'", "field 'sha265'", "did you mean 'sha256'"]),
        ('[keys.alice.x]\nsha256 = "' + DIGEST + '"\n', ["key 'alice'", "field 'x'", "unknown key"]),
        ('[keys.alice]\nsha256 = "' + DIGEST + '"\nbudget = 5\n', ["key 'alice'", "field 'budget'", "5"]),
        (key_table("alice", ALICE, "callz = 3"), ["key 'alice'", "field 'budget.callz'", "did you mean 'calls'"]),
        (key_table("alice", ALICE, "calls = -1"), ["key 'alice'", "field 'budget.calls'", "-1"]),
        (key_table("alice", ALICE, "calls = 1.5"), ["key 'alice'", "field 'budget.calls'", "integer", "1.5"]),
        (key_table("alice", ALICE, 'cost_usd = "5"'), ["key 'alice'", "field 'budget.cost_usd'", "'5'"]),
        (key_table("alice", ALICE, "cost_usd = nan"), ["key 'alice'", "field 'budget.cost_usd'", "nan"]),
        (key_table("alice", ALICE) + key_table("bob", ALICE), ["key 'bob'", "field 'sha256'", "key 'alice'"]),
    ],
    ids=[
        "toml",
        "top-level",
        "no-keys",
        "dot-in-id",
        "long-id",
        "no-digest",
        "digest-not-string",
        "misspelt-field",
        "dotted-table",
        "budget-not-table",
        "unknown-limit",
        "negative-limit",
        "fractional-calls",
        "cost-string",
        "cost-nan",
        "shared-digest",
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_file_key_and_field(tmp_path: Path, text: str, named: list[str]) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_keys(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ")
    for part in named:
        assert part in message


def test_a_token_pasted_instead_of_its_digest_is_refused_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.alice]\nsha256 = "{ALICE}"\n')
    with pytest.raises(ConfigError, match=r"key 'alice': field 'sha256': expected the 64 hex digits") as refused:
        read_keys(path)
    assert ALICE not in str(refused.value)


def test_a_missing_keys_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml: cannot read the keys file"):
        read_keys(tmp_path / "nowhere.toml")


def test_a_keys_file_gives_each_key_its_budget(tmp_path: Path) -> None:
    path = write_keys(
        tmp_path / "keys.toml",
        key_table("alice", ALICE, "calls = 100\ncost_usd = 5"),
        key_table("bob", BOB),
    )
    keys = read_keys(path)
    assert keys["alice"].budget == moa_stream.Limits(calls=100, cost_usd=5.0)
    assert isinstance(keys["alice"].budget.cost_usd, float)
    assert keys["bob"].budget is None
    assert keys["alice"].digest.hex() == token_digest(ALICE)


# -- the command line -------------------------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moa-stream")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_keys_with_token_env_is_a_usage_error_naming_both(keys_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        serve_args("--keys", str(keys_file), "--token-env", "MOA_TEST_TOKEN")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--keys" in err
    assert "--token-env" in err


def test_serve_refuses_a_bad_keys_file_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(key_table("alice", ALICE, "calls = 0"))
    assert run_serve(serve_args("--keys", str(path))) == 2
    err = capsys.readouterr().err
    assert f"{path}: key 'alice': field 'budget.calls'" in err


def test_hash_token_prints_the_line_that_lets_the_token_in(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{ALICE}\n"))
    assert run_serve(serve_args("--hash-token")) == 0
    line = capsys.readouterr().out
    assert ALICE not in line
    path = tmp_path / "keys.toml"
    path.write_text(f"[keys.alice]\n{line}")
    assert KeyRing.load(path).match(ALICE.encode()) == "alice"


def test_hash_token_refuses_an_empty_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert run_serve(serve_args("--hash-token")) == 2
    assert "no token" in capsys.readouterr().err


# -- who may call -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("sk-wrong"), {"authorization": f"Basic {ALICE}"}, {"authorization": "Bearer"}, bearer(DIGEST)],
    ids=["missing", "wrong", "not-bearer", "empty", "the-digest"],
)
async def test_a_request_without_a_keys_token_is_a_401(
    sim: Simulator, log: EventLog, tmp_path: Path, keys_file: Path, headers: dict[str, str]
) -> None:
    async with serving(sim, log, tmp_path, KeyRing.load(keys_file)) as (server, _), raw(server) as http:
        chat = await http.post("chat/completions", json=CHAT, headers=headers)
        models = await http.get("models", headers=headers)
        look = await http.get("responses/resp_123", headers=headers)
    for response in (chat, models, look):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert log.of(moa_stream.CallUsage) == []
    assert sim.stats.requests == 0


async def test_each_keys_token_is_served(sim: Simulator, log: EventLog, tmp_path: Path, keys_file: Path) -> None:
    async with serving(sim, log, tmp_path, KeyRing.load(keys_file)) as (server, _):
        for token in (ALICE, BOB):
            async with caller(server, token) as client:
                completion = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
                assert completion.choices[0].message.content
    assert [call.status for call in log.of(moa_stream.CallUsage)] == ["completed", "completed"]
    assert ALICE not in repr(log.events)


# -- sessions of their own --------------------------------------------------------------------------


async def test_two_keys_sending_the_same_session_id_are_in_different_sessions(
    sim: Simulator, log: EventLog, tmp_path: Path, keys_file: Path
) -> None:
    async with serving(sim, log, tmp_path, KeyRing.load(keys_file)) as (server, _):
        for token in (ALICE, BOB):
            async with caller(server, token) as client:
                await client.chat.completions.create(**CHAT, extra_headers={"X-MoA-Session": "s1"})  # type: ignore[call-overload]
    assert sorted(call.session_id for call in log.of(moa_stream.CallUsage)) == ["alice.s1", "bob.s1"]
    traces = tmp_path / "traces"
    assert sorted(path.name for path in traces.glob("*.jsonl")) == ["alice.s1.jsonl", "bob.s1.jsonl"]
    assert len(list(moa_stream.read_traces(traces / "bob.s1.jsonl"))) == 1


async def test_a_request_without_a_session_is_in_its_keys_default_session(
    sim: Simulator, log: EventLog, tmp_path: Path, keys_file: Path
) -> None:
    async with serving(sim, log, tmp_path, KeyRing.load(keys_file)) as (server, _), caller(server, ALICE) as client:
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    [call] = log.of(moa_stream.CallUsage)
    assert call.session_id == "alice.default"


@pytest.mark.parametrize("session_id", ["bob.s1", "../bob.s1", ".bob.s1", "bob"])
async def test_a_key_naming_another_keys_session_stays_in_its_own(
    sim: Simulator, log: EventLog, tmp_path: Path, keys_file: Path, session_id: str
) -> None:
    async with serving(sim, log, tmp_path, KeyRing.load(keys_file)) as (server, _), caller(server, ALICE) as client:
        headers = {"X-MoA-Session": session_id, "X-MoA-Key": "bob"}
        await client.chat.completions.create(**CHAT, extra_headers=headers)  # type: ignore[call-overload]
    [call] = log.of(moa_stream.CallUsage)
    assert call.session_id.startswith("alice.")
    assert [path.name for path in (tmp_path / "traces").glob("*.jsonl")] == [f"{call.session_id}.jsonl"]


async def test_a_session_refusal_names_the_keys_session(sim: Simulator, log: EventLog, tmp_path: Path) -> None:
    keys = KeyRing.load(write_keys(tmp_path / "keys.toml", key_table("alice", ALICE)))
    budget = moa_stream.Budget(session=moa_stream.Limits(calls=1))
    client = moa_stream.wrap(sim_client(sim, max_retries=0), sinks=[log], budget=budget)
    app = create_app(client, keys=keys)
    async with Server(app, port=0, graceful_timeout=5) as server, caller(server, ALICE) as remote:
        headers = {"X-MoA-Session": "s1"}
        await remote.chat.completions.create(**CHAT, extra_headers=headers)  # type: ignore[call-overload]
        with pytest.raises(openai.BadRequestError) as refused:
            await remote.chat.completions.create(**CHAT, extra_headers=headers)  # type: ignore[call-overload]
    assert refused.value.code == "budget_exceeded"
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["session_id"] == "alice.s1"


async def test_the_per_client_limit_counts_per_key(
    sim: Simulator, log: EventLog, tmp_path: Path, keys_file: Path
) -> None:
    keys = KeyRing.load(keys_file)
    async with serving(sim, log, tmp_path, keys, max_concurrent_per_client=1) as (server, _), raw(server) as http:
        long = CHAT | {"model": "sim-long", "stream": True}
        async with http.stream("POST", "chat/completions", json=long, headers=bearer(ALICE)) as first:
            assert first.status_code == 200
            chunks = first.aiter_bytes()  # kept: a collected iterator would close the response
            await anext(chunks)  # alice's first request holds her one slot while it streams
            alice = await http.post("chat/completions", json=CHAT, headers=bearer(ALICE))
            bob = await http.post("chat/completions", json=CHAT, headers=bearer(BOB))
    assert alice.status_code == 429, alice.text
    assert bob.status_code == 200, bob.text


# -- reloading --------------------------------------------------------------------------------------


async def test_the_engine_has_each_keys_budget_after_load_and_reload(
    sim: Simulator, log: EventLog, tmp_path: Path
) -> None:
    path = write_keys(
        tmp_path / "keys.toml",
        key_table("alice", ALICE, "calls = 100\ncost_usd = 5.0"),
        key_table("bob", BOB, "total_tokens = 1000"),
    )
    keys = KeyRing.load(path)
    async with serving(sim, log, tmp_path, keys) as (_, client):
        engine = _engine_of(client)
        assert engine.key_limits == {
            "alice": moa_stream.Limits(calls=100, cost_usd=5.0),
            "bob": moa_stream.Limits(total_tokens=1000),
        }
        write_keys(path, key_table("alice", ALICE, "calls = 7"), key_table("carol", "sk-carol", "calls = 1"))
        assert await keys.reload()
        assert engine.key_limits == {"alice": moa_stream.Limits(calls=7), "carol": moa_stream.Limits(calls=1)}
        write_keys(path, key_table("alice", ALICE))
        assert await keys.reload()
        assert engine.key_limits == {}


async def test_a_key_removed_from_the_file_is_refused_right_after_the_reload(
    sim: Simulator, log: EventLog, tmp_path: Path, keys_file: Path
) -> None:
    keys = KeyRing.load(keys_file)
    async with serving(sim, log, tmp_path, keys) as (server, _), raw(server) as http:
        assert (await http.get("models", headers=bearer(BOB))).status_code == 200
        write_keys(keys_file, key_table("alice", ALICE))
        assert await keys.reload()
        assert (await http.get("models", headers=bearer(BOB))).status_code == 401
        assert (await http.post("chat/completions", json=CHAT, headers=bearer(BOB))).status_code == 401
        assert (await http.get("models", headers=bearer(ALICE))).status_code == 200


async def test_a_bad_file_on_reload_keeps_the_old_keys_and_logs_the_problem(
    sim: Simulator, log: EventLog, tmp_path: Path, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = KeyRing.load(keys_file)
    async with serving(sim, log, tmp_path, keys) as (server, client), raw(server) as http:
        write_keys(keys_file, key_table("alice", ALICE, "calls = -3"))
        assert not await keys.reload()
        assert (await http.get("models", headers=bearer(BOB))).status_code == 200
        assert _engine_of(client).key_limits == {}
    [record] = [r for r in caplog.records if r.name == "moa_stream.server"]
    assert record.levelname == "ERROR"
    assert f"{keys_file}: key 'alice': field 'budget.calls'" in record.getMessage()


_SERVE_MAIN = """
import argparse, sys
from moa_stream._server import add_serve_parser, run_serve
parser = argparse.ArgumentParser(prog="moa-stream")
add_serve_parser(parser.add_subparsers(dest="command", required=True))
sys.exit(run_serve(parser.parse_args(sys.argv[1:])))
"""


async def test_sighup_reloads_the_keys_of_a_running_serve(tmp_path: Path, keys_file: Path) -> None:
    command = [sys.executable, "-c", _SERVE_MAIN, "serve", "--port", "0", "--keys", str(keys_file)]
    async with await anyio.open_process(command, stdout=subprocess.DEVNULL) as process:
        assert process.stderr is not None
        stderr = BufferedByteReceiveStream(process.stderr)

        async def line_with(text: str) -> str:
            with anyio.fail_after(15):
                line = ""
                while text not in line:
                    line = (await stderr.receive_until(b"\n", 65536)).decode()
                return line

        banner = await line_with("moa-stream serving on ")
        assert f"keys: 2 from {keys_file}" in banner
        async with default_http_module().AsyncClient(base_url=banner.split()[3], timeout=10) as http:
            assert (await http.get("models", headers=bearer(BOB))).status_code == 200

            write_keys(keys_file, key_table("alice", ALICE))
            process.send_signal(signal.SIGHUP)
            # The server says when the new keys are in force: from then on, bob is refused.
            await line_with("reloaded 1 key from")
            assert (await http.get("models", headers=bearer(BOB))).status_code == 401
            assert (await http.get("models", headers=bearer(ALICE))).status_code == 200

            write_keys(keys_file, "[keys.alice\n")
            process.send_signal(signal.SIGHUP)
            problem = await line_with("cannot reload the keys")
            assert f"{keys_file}: invalid TOML" in problem
            assert (await http.get("models", headers=bearer(ALICE))).status_code == 200

        process.send_signal(signal.SIGINT)
        with anyio.fail_after(15):
            assert await process.wait() == 0


# -- key-level budgets (enforced by the engine) -----------------------------------------------------
# These need the engine to enforce `Engine.key_limits` over all of a key's sessions.


async def test_a_keys_budget_spans_all_of_its_sessions(sim: Simulator, log: EventLog, tmp_path: Path) -> None:
    path = write_keys(tmp_path / "keys.toml", key_table("alice", ALICE, "calls = 2"), key_table("bob", BOB))
    async with serving(sim, log, tmp_path, KeyRing.load(path)) as (server, _):
        async with caller(server, ALICE) as alice:
            for session_id in ("s1", "s2"):
                await alice.chat.completions.create(**CHAT, extra_headers={"X-MoA-Session": session_id})  # type: ignore[call-overload]
            with pytest.raises(openai.BadRequestError) as refused:
                await alice.chat.completions.create(**CHAT, extra_headers={"X-MoA-Session": "s3"})  # type: ignore[call-overload]
        async with caller(server, BOB) as bob:
            await bob.chat.completions.create(**CHAT, extra_headers={"X-MoA-Session": "s3"})  # type: ignore[call-overload]
    assert refused.value.code == "budget_exceeded"
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["limit"] == "calls"
    assert sim.stats.requests == 3


async def test_a_client_cannot_spend_under_another_keys_budget(sim: Simulator, log: EventLog, tmp_path: Path) -> None:
    path = write_keys(tmp_path / "keys.toml", key_table("alice", ALICE, "calls = 1"), key_table("bob", BOB))
    async with serving(sim, log, tmp_path, KeyRing.load(path)) as (server, _), caller(server, ALICE) as alice:
        await alice.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        with pytest.raises(openai.BadRequestError) as refused:
            headers = {"X-MoA-Key": "bob", "X-MoA-Session": "bob.fresh"}
            await alice.chat.completions.create(**CHAT, extra_headers=headers)  # type: ignore[call-overload]
    assert refused.value.code == "budget_exceeded"
    assert sim.stats.requests == 1


async def test_a_raised_budget_takes_effect_on_reload(sim: Simulator, log: EventLog, tmp_path: Path) -> None:
    path = write_keys(tmp_path / "keys.toml", key_table("alice", ALICE, "calls = 1"))
    keys = KeyRing.load(path)
    async with serving(sim, log, tmp_path, keys) as (server, _), caller(server, ALICE) as alice:
        await alice.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        with pytest.raises(openai.BadRequestError):
            await alice.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        write_keys(path, key_table("alice", ALICE, "calls = 2"))
        assert await keys.reload()
        await alice.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert sim.stats.requests == 2
