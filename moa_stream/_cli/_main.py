"""The `moa-stream` command: `demo`, `sim`, `serve`, `traces`, `bench` and `local`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio

from .._server import add_serve_parser, run_serve
from ._traces import add_traces_parser, run_traces


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moa-stream", description="Mixture-of-Agents streaming middleware")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="a Mixture-of-Agents turn on the embedded simulator or a real endpoint")
    demo.add_argument("--base-url", help="an OpenAI-compatible endpoint instead of the embedded simulator")
    demo.add_argument("--api-key", help="API key for --base-url (default: $OPENAI_API_KEY)")
    demo.add_argument("--config", type=Path, help="a moa.toml with [presets.<name>] tables")
    demo.add_argument("--preset", help="which preset of --config to run (default: the first)")
    demo.add_argument(
        "--model", action="append", default=[], help="reference model (repeat; one model = 3 Self-MoA samples)"
    )
    demo.add_argument("--aggregator", help="aggregator model (default: the first --model)")
    demo.add_argument("--trace-dir", type=Path, default=Path("traces"), help="where trace files go (default: traces)")
    demo.add_argument(
        "--api",
        choices=("chat", "responses"),
        default="chat",
        help="the API the turn is asked through: chat runs it as a streamed chat completion "
        "(client.chat.completions.create), responses as a streamed Responses API call (client.responses.create, "
        "the answer printed from its response.output_text.delta events); default: chat",
    )
    demo.add_argument(
        "--local", action="store_true", help="SmolLM2-135M on a llama.cpp server started here (the `local` extra)"
    )

    sim = commands.add_parser("sim", help="serve the embedded simulator over HTTP")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)

    bench = commands.add_parser("bench", help="the benchmark suite (needs a source checkout)", description=_BENCH_ABOUT)
    bench.add_argument("--quick", action="store_true", help="few rounds and small sizes (under a minute)")
    bench.add_argument(
        "--sections",
        nargs="+",
        choices=BENCH_SECTIONS,
        metavar="SECTION",
        help=f"any of {', '.join(BENCH_SECTIONS)} (default: all)",
    )
    bench.add_argument("--out-dir", type=Path, help="where the JSON and PNG files go (default: benchmarks/results)")

    local = commands.add_parser("local", help="llama.cpp with SmolLM2-135M on loopback (the `local` extra)")
    local_commands = local.add_subparsers(dest="local_command", required=True)
    local_serve = local_commands.add_parser("serve", help="serve SmolLM2-135M until Ctrl-C")
    local_serve.add_argument("--host", default="127.0.0.1")
    local_serve.add_argument("--port", type=int, default=0, help="default: a free port")

    add_serve_parser(commands)
    add_traces_parser(commands)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "traces":
        return run_traces(args)
    if args.command == "bench":
        return _bench(args, argv)
    if args.command == "local":
        return _local(lambda: _serve_local(args.host, args.port))
    if args.command == "demo" and args.local:
        if args.base_url or args.config or args.model or args.aggregator:
            demo.error("--local brings its own server and preset: no --base-url, --config, --model or --aggregator")
        from ._demo import run_local_demo

        return _local(lambda: run_local_demo(trace_dir=args.trace_dir, api=args.api))
    if args.command == "demo":
        from .._errors import ConfigError
        from ._demo import run_demo

        try:
            anyio.run(
                lambda: run_demo(
                    base_url=args.base_url,
                    api_key=args.api_key,
                    models=args.model,
                    aggregator=args.aggregator,
                    config=args.config,
                    preset=args.preset,
                    trace_dir=args.trace_dir,
                    api=args.api,
                )
            )
        except ConfigError as exc:  # a bad preset or a key variable that is not set: one line, no traceback
            print(f"moa-stream demo: {exc}", file=sys.stderr)
            return 2
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_serve_simulator, args.host, args.port)
    return 0


BENCH_SECTIONS = ("chunks", "sinks", "concurrency", "fanout", "responses")
"""The sections of `benchmarks/suite.py`, named here so that `--help` works without a checkout."""


_BENCH_ABOUT = (
    "Run the benchmark suite (benchmarks/ of a source checkout) against the embedded simulator: per-chunk cost, "
    "sinks on/off, concurrency, fan-out. Prints tables and writes JSON (and PNG plots with matplotlib) to "
    "benchmarks/results/."
)


def _bench(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Run `benchmarks/` of the source checkout this package was imported from."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "suite.py").is_file():
        print(
            "moa-stream bench: the benchmarks need a source checkout (they are not part of the installed package); "
            "clone the repository, `pip install -e '.[bench]'` and run `moa-stream bench` there",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite = importlib.import_module("benchmarks.suite")
    if args.out_dir is None:
        args.out_dir = suite.RESULTS_DIR
    command = shlex.join(["moa-stream", *(sys.argv[1:] if argv is None else argv)])
    code: int = suite.run_command(args, command=command)
    return code


def _local(run: Callable[[], Awaitable[object]]) -> int:
    """Run something that starts the local llama.cpp server; a missing extra or a failed start is exit 2."""
    from ._local import LocalServerError

    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(run)
    except LocalServerError as exc:
        print(f"moa-stream: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve_local(host: str, port: int) -> None:
    from ._local import LocalServer

    # SIGTERM too: stopping by the default action would leave the server process running.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with LocalServer(host=host, port=port) as server:
            print(
                f"llama.cpp serves {server.gguf.name} as {server.model!r} on {server.base_url} (Ctrl-C stops it)",
                file=sys.stderr,
                flush=True,
            )
            async for _ in signals:
                break


async def _serve_simulator(host: str, port: int) -> None:
    from ..testing import SimServer, default_simulator

    async with SimServer(default_simulator(), host=host, port=port) as server:
        print(f"simulator listening on {server.base_url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    raise SystemExit(main())
