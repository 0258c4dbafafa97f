"""The demo, on the embedded simulator and against an OpenAI-compatible server given by URL."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import moa_stream
from moa_stream._demo import run_demo
from moa_stream._sim import Simulator

from .conftest import MODELS, ServerThread


def test_demo_command_runs_on_the_embedded_simulator(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moa_stream", "demo", "--trace-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    table = result.stdout.split("------------")[-1]
    assert table.count("completed") == 3
    assert table.count("closed_early") == 1
    [trace] = tmp_path.glob("*.jsonl")
    assert f"4 turns traced in {trace}" in result.stdout
    assert len(list(moa_stream.read_traces(trace))) == 4


async def test_demo_against_a_server_given_by_base_url(tmp_path: Path) -> None:
    out = io.StringIO()
    with ServerThread(Simulator(MODELS)) as server:
        calls = await run_demo(
            base_url=server.base_url, api_key="k", models=["sim-small", "sim-large"], trace_dir=tmp_path, out=out
        )
    assert [c.model for c in calls].count("sim-large") == 3
    assert all(c.provider == "127.0.0.1" for c in calls)
    assert "sim-large" in out.getvalue()
    assert (tmp_path / "demo.jsonl").exists()
