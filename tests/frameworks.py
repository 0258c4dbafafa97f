"""Shared by the framework adapter tests: a network guard and our per-turn view of the events.

A plugin of `tests/conftest.py`, so its fixtures (`offline`, `native`) are there for every test module.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

import moa_stream
from moa_stream.testing import Simulator

from .conftest import EventLog


def guard_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse any connection or name lookup beyond loopback; returns the list of attempts made."""
    attempts: list[str] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def loopback(host: object) -> bool:
        host = host.decode() if isinstance(host, bytes) else str(host)
        with contextlib.suppress(ValueError):
            return ipaddress.ip_address(host).is_loopback
        return host == "localhost"

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and not loopback(address[0]):
            attempts.append(f"connect {address!r}")
            raise OSError("the network is off in these tests")
        connect(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not loopback(host):
            attempts.append(f"getaddrinfo {host!r}")
            raise socket.gaierror("the network is off in these tests")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


weather_calls: list[dict[str, Any]] = []
"""Every call of `get_weather`, the tool the frameworks execute (clear it before a run)."""


def get_weather(city: str, days: int) -> str:
    """The weather forecast for a city.

    Args:
        city: The city.
        days: How many days ahead.
    """
    weather_calls.append({"city": city, "days": days})
    return f"sunny in {city} for {days} days"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse (and fail the test on) any connection or name lookup beyond loopback; frameworks that
    read OPENAI_API_KEY find a dummy one. Use with `pytestmark = pytest.mark.usefixtures("offline")`."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-used")
    attempts = guard_network(monkeypatch)
    yield
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture
def native() -> bool:
    """Whether the simulator serves `/responses` (NATIVE_OR_BRIDGED parametrizes it)."""
    return True


class MeteredTurn(NamedTuple):
    roles: list[str]
    input_tokens: int
    output_tokens: int


async def metered_turns(log: EventLog, sim: Simulator, turns: int) -> list[MeteredTurn]:
    """Our view of `turns` completed turns, in the order they started: each one's call roles and
    tokens summed over its `CallUsage` events. Checks one `CallUsage` per upstream call."""
    await log.wait_turns(turns)
    calls = log.of(moa_stream.CallUsage)
    assert len({c.call_id for c in calls}) == len(calls) == sum(sim.stats.requests_by_model.values())
    assert {(c.status, c.usage_source) for c in calls} == {("completed", "reported")}
    ends = sorted(log.of(moa_stream.TurnEnd), key=lambda end: end.started_at)
    assert [end.status for end in ends] == ["completed"] * turns
    return [
        MeteredTurn(
            roles=sorted(c.role for c in calls if c.turn_id == end.turn_id),
            input_tokens=sum(c.input_tokens or 0 for c in calls if c.turn_id == end.turn_id),
            output_tokens=sum(c.output_tokens or 0 for c in calls if c.turn_id == end.turn_id),
        )
        for end in ends
    ]


# -- the Responses API ---------------------------------------------------------------------------

NATIVE_OR_BRIDGED = pytest.mark.parametrize("native", [True, False], ids=["native", "bridged"])
"""Parametrizes a test's `native` fixture: an upstream that serves `/responses`, or one that does not
(`Simulator(..., responses=False)`, so a MoA aggregator is bridged from chat completions)."""


class ApiTurn(NamedTuple):
    calls: list[tuple[str, str]]
    """(role, api) of each call of the turn that the upstream answered, sorted."""
    probes: int
    """The aggregator's tries at `/responses` that an upstream without it answered 404 (bridged then)."""
    input_tokens: int
    output_tokens: int


async def metered_api_turns(log: EventLog, sim: Simulator, turns: int) -> list[ApiTurn]:
    """Our view of `turns` completed turns, in the order they started: each one's calls by role and
    API and its tokens summed over its `CallUsage` events (a probe's are none).

    Checks one `CallUsage` per request the simulator received: every answered one completed with
    reported usage, its API the one the simulator was asked through (a body with `input` is a
    Responses request, one with `messages` a chat completion), and every other one a probe, an
    aggregator's try at `/responses` answered 404 (which the simulator does not count by model)."""
    await log.wait_turns(turns)
    calls = log.of(moa_stream.CallUsage)
    assert len({c.call_id for c in calls}) == len(calls) == sim.stats.requests
    probes = [c for c in calls if c.http_status == 404]
    answered = [c for c in calls if c.http_status != 404]
    assert {(c.role, c.api, c.status) for c in probes} <= {("aggregator", "responses", "error")}
    assert len(answered) == sum(sim.stats.requests_by_model.values())
    assert {(c.status, c.usage_source) for c in answered} == {("completed", "reported")}
    seen = sorted((r["model"], "responses" if "input" in r else "chat") for r in sim.requests_seen)
    assert sorted((c.model, c.api) for c in answered) == seen
    ends = sorted(log.of(moa_stream.TurnEnd), key=lambda end: end.started_at)
    assert [end.status for end in ends] == ["completed"] * turns
    return [
        ApiTurn(
            calls=sorted((c.role, c.api) for c in answered if c.turn_id == end.turn_id),
            probes=sum(c.turn_id == end.turn_id for c in probes),
            input_tokens=sum(c.input_tokens or 0 for c in calls if c.turn_id == end.turn_id),
            output_tokens=sum(c.output_tokens or 0 for c in calls if c.turn_id == end.turn_id),
        )
        for end in ends
    ]


def moa_tool_loop(native: bool) -> list[tuple[list[tuple[str, str]], int]]:
    """(calls, probes) of the two turns of a MoA tool loop asked through the Responses API: the
    question runs the references (chat completions) and the aggregator, the tool's output (the same
    user turn) the aggregator only. The aggregator is asked through `/responses` on an upstream
    that has it; on one without, its first try there is answered 404 and from then on it is bridged
    from a chat completion."""
    aggregator = ("aggregator", "responses" if native else "chat")
    return [([aggregator, ("reference", "chat"), ("reference", "chat")], 0 if native else 1), ([aggregator], 0)]


EARLY_BRIDGED = {
    status: [("aggregator", "chat", status), ("aggregator", "responses", "error")]
    for status in ("cancelled", "closed_early")
}
"""The aggregator's calls, sorted, when the caller stops reading a bridged answer: the probe
answered 404, then the chat completion that ended as the caller left it."""


def misplaced_chat_messages(messages: list[dict[str, Any]]) -> list[str]:
    """What a chat-completions upstream would refuse in `messages`: a tool message that does not
    answer a tool call of the assistant message (and tool messages) just before it (OpenAI: 400,
    "messages with role 'tool' must be a response to a preceding message with 'tool_calls'"), and a
    system message after the conversation started (many open models' chat templates refuse it)."""
    problems: list[str] = []
    open_calls: set[str] = set()
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            if message.get("tool_call_id") not in open_calls:
                problems.append(f"{index}: tool message not right after its assistant tool call")
            continue
        open_calls = {call["id"] for call in message.get("tool_calls") or ()} if role == "assistant" else set()
        if role == "system" and any(m.get("role") != "system" for m in messages[:index]):
            problems.append(f"{index}: system message inside the conversation")
    return problems
