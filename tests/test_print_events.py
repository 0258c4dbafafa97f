"""`print_events`: a sink for people, one short line per event on stderr, the answer left alone."""

from __future__ import annotations

import io

import msgspec
import pytest

import moa_stream
from moa_stream import Preset
from moa_stream._print import describe
from moa_stream.testing import SimModel, Simulator, sim_client

from .conftest import EventLog
from .test_traces import trace_record


async def test_a_moa_turn_prints_short_lines_on_stderr_and_nothing_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim = Simulator([SimModel(name=name) for name in ("ref-a", "ref-b", "agg")])
    log = EventLog()
    presets = {"duo": Preset(references=["ref-a", "ref-b"], aggregator="agg")}
    client = moa_stream.wrap(sim_client(sim), presets=presets, sinks=[moa_stream.print_events, log])
    await client.chat.completions.create(model="moa:duo", messages=[{"role": "user", "content": "Hello!"}])
    await client.close()
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == ""
    assert len(lines) == len(log.events) - len(log.of(moa_stream.TurnTrace))  # one per event but the trace
    assert max(len(line) for line in lines) < 160
    assert any(line.startswith("[turn] moa:duo: completed, 3 calls") for line in lines)
    assert any(line.startswith("[moa:duo] layer 1: ref-a completed (") for line in lines)
    assert any(line.startswith("[call] aggregator agg: completed") for line in lines)


def test_a_refused_turn_says_why() -> None:
    end = msgspec.structs.replace(
        trace_record().end,
        model="moa:duo",
        status="error",
        error="moa_stream budget exceeded: the session limit session.calls is 3 calls",
    )
    out = io.StringIO()
    moa_stream.print_events(end, file=out)
    assert out.getvalue() == describe(end) + "\n"
    assert "(moa_stream budget exceeded: the session limit session.calls is 3 calls)" in out.getvalue()
