"""Processes sharing a trace directory and a session: the session's sidecar adds up every process's
calls and keeps every process's state keys, however their writes interleave."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import anyio

import moa_stream
from moa_stream.testing import SimModel, Simulator, sim_client

_WORKER = textwrap.dedent(
    """
    import sys, anyio, moa_stream
    from moa_stream.testing import SimModel, Simulator, sim_client

    async def main(directory: str, name: str, calls: int) -> None:
        client = moa_stream.wrap(sim_client(Simulator([SimModel(name="sim-small")])), trace_dir=directory)
        with moa_stream.session("shared"):
            for number in range(calls):
                await client.chat.completions.create(
                    model="sim-small", messages=[{"role": "user", "content": "hi"}]
                )
                moa_stream.session_state(client).set(name, number)
                if number % 3 == 0:
                    await moa_stream.flush(client)  # writes interleave with the other processes'
        await client.close()

    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)


async def test_a_session_written_by_several_processes_adds_up_all_of_them(tmp_path: Path) -> None:
    calls = 12
    codes: list[int] = []

    async def worker(name: str) -> None:
        done = await anyio.run_process([sys.executable, "-c", _WORKER, str(tmp_path), name, str(calls)], check=False)
        codes.append(done.returncode)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for n in range(3):
                group.start_soon(worker, f"worker-{n}")
    assert codes == [0, 0, 0]
    client = moa_stream.wrap(sim_client(Simulator([SimModel(name="sim-small")])), trace_dir=tmp_path)
    ledger = moa_stream.session_ledger(client, "shared")
    state = moa_stream.session_state(client, "shared").items()
    await client.close()
    assert ledger.totals.calls == 3 * calls
    assert ledger.turns == 3 * calls
    assert ledger.by_model["sim-small"].calls == 3 * calls
    assert state == {f"worker-{n}": calls - 1 for n in range(3)}
    traces = list(moa_stream.read_traces(tmp_path / "shared.jsonl"))
    assert sum(len(trace.calls) for trace in traces) == ledger.totals.calls
    assert sum(trace.end.output_tokens for trace in traces) == ledger.totals.output_tokens


async def test_a_process_takes_in_what_others_added_when_it_writes(tmp_path: Path) -> None:
    sim = Simulator([SimModel(name="sim-small")])
    first = moa_stream.wrap(sim_client(sim), trace_dir=tmp_path)
    second = moa_stream.wrap(sim_client(sim), trace_dir=tmp_path)  # as another process would be
    with moa_stream.session("both"):
        for client in (first, second, first):
            await client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "hi"}])
            assert await moa_stream.flush(client)
    assert moa_stream.session_ledger(first, "both").totals.calls == 3  # its own two, and the other's one
    await first.close()
    await second.close()
