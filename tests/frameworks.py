"""Shared by the framework adapter tests: a network guard and our per-turn view of the events."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
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
