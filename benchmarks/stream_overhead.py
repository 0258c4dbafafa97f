"""What metering adds to a streamed chat completion, measured side by side in one run.

The simulator serves zero-latency streams from a subprocess over loopback HTTP, so this process's
CPU time is the client's alone. Each round streams the same completion with three readers in turn:

- `floor`: the HTTP client and msgspec, no SDK (what parsing the stream costs at the least);
- `bare`: the openai SDK's `AsyncOpenAI`;
- `wrapped`: the same client wrapped by moa_stream, with a sink and a trace file (events and
  traces on; their thread's CPU time counts too).

Prints CPU microseconds per chunk (median of the rounds, with min-max) and the ratios to `bare`,
and writes them as JSON. Run: `.venv/bin/python benchmarks/stream_overhead.py [--chunks 1000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import openai
from openai.types.chat import ChatCompletionMessageParam

import moa_stream
from moa_stream._httpcompat import default_module

SERVER = """
import sys, anyio
from moa_stream._sim import Simulator, SimModel
from moa_stream._sim_server import serve_forever
sizes = [int(s) for s in sys.argv[2].split(",")]
sim = Simulator([SimModel(name=f"bench-{n}", reply_tokens=n) for n in sizes])
anyio.run(serve_forever, sim, "127.0.0.1", int(sys.argv[1]))
"""

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count for me"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("simulator did not start")


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta


class _Chunk(msgspec.Struct):
    choices: list[_Choice]


_chunk_decoder = msgspec.json.Decoder(_Chunk)


async def floor_reader(http: Any, base_url: str, model: str) -> int:
    body = {"model": model, "messages": MESSAGES, "stream": True}
    chunks = 0
    async with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                _chunk_decoder.decode(line[6:])
                chunks += 1
    return chunks


async def sdk_reader(client: openai.AsyncOpenAI, model: str) -> int:
    chunks = 0
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    async with stream:
        async for _ in stream:
            chunks += 1
    return chunks


async def cpu_per_chunk(read: Callable[[str], Awaitable[int]], model: str) -> float:
    start = time.process_time()
    chunks = await read(model)
    return (time.process_time() - start) / chunks * 1e6


async def run(sizes: list[int], rounds: int, base_url: str, trace_dir: Path) -> dict[str, Any]:
    http_module = default_module()
    http = http_module.AsyncClient(timeout=60)
    bare = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    wrapped = moa_stream.wrap(
        openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0),
        sinks=[lambda event: None],
        trace_dir=trace_dir,
    )
    readers: dict[str, Callable[[str], Awaitable[int]]] = {
        "floor": lambda model: floor_reader(http, base_url, model),
        "bare": lambda model: sdk_reader(bare, model),
        "wrapped": lambda model: sdk_reader(wrapped, model),
    }
    results: dict[str, Any] = {}
    for size in sizes:
        model = f"bench-{size}"
        for read in readers.values():  # warm up connections and code paths
            await read(model)
        samples: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(rounds):
            for name, read in readers.items():
                samples[name].append(await cpu_per_chunk(read, model))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        results[str(size)] = {
            name: {"median_us": medians[name], "min_us": min(values), "max_us": max(values)}
            for name, values in samples.items()
        } | {
            "wrapped_over_bare": medians["wrapped"] / medians["bare"],
            "floor_over_bare": medians["floor"] / medians["bare"],
        }
    await wrapped.close()
    await bare.close()
    await http.aclose()
    return results


def print_table(results: dict[str, Any]) -> None:
    print(
        f"{'chunks':>7}  {'floor µs':>9}  {'bare µs':>9}  {'wrapped µs':>10}  {'wrapped/bare':>12}  {'floor/bare':>10}"
    )
    for size, row in results.items():
        print(
            f"{size:>7}  {row['floor']['median_us']:>9.1f}  {row['bare']['median_us']:>9.1f}  "
            f"{row['wrapped']['median_us']:>10.1f}  {row['wrapped_over_bare']:>12.3f}  {row['floor_over_bare']:>10.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chunks", default="100,1000", help="comma-separated stream lengths (default 100,1000)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stream_overhead.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.chunks.split(",")]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), ",".join(map(str, sizes))])
    try:
        wait_for_port(port)
        with tempfile.TemporaryDirectory() as trace_dir:
            results = asyncio.run(run(sizes, args.rounds, f"http://127.0.0.1:{port}/v1", Path(trace_dir)))
    finally:
        server.terminate()
        server.wait()
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"openai": openai.__version__, "rounds": args.rounds, "cpu_count": os.cpu_count(), "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
