"""The `moa-stream` command: `demo`, `sim`, `serve`, `traces`, `bench` and `local`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import signal
import sys
import types
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio

from .._server import add_serve_parser, run_serve
from ._traces import add_traces_parser, positive, run_traces


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

    bench = commands.add_parser(
        "bench",
        help="the benchmark suite on the embedded simulator, or an endpoint (--base-url)",
        description=_BENCH_ABOUT,
    )
    bench.add_argument("--quick", action="store_true", help="few rounds and small sizes (under a minute)")
    bench.add_argument(
        "--sections",
        nargs="+",
        choices=BENCH_SECTIONS,
        metavar="SECTION",
        help=f"any of {', '.join(BENCH_SECTIONS)} (default: all)",
    )
    bench.add_argument(
        "--out-dir",
        type=Path,
        help="where the JSON and PNG files go (default: benchmarks/results in a source checkout, "
        "else ./moa-stream-bench)",
    )
    endpoint = bench.add_argument_group(
        "an endpoint instead of the suite",
        "the bare SDK, the wrapped client and fast mode against an OpenAI-compatible endpoint, side by side",
    )
    endpoint.add_argument("--base-url", help="the endpoint, e.g. http://127.0.0.1:8000/v1 (switches from the suite)")
    endpoint.add_argument("--model", help="the model to ask for (required with --base-url)")
    endpoint.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="the environment variable holding the API key; it must be set (default: OPENAI_API_KEY, which a "
        "loopback endpoint may go without)",
    )
    endpoint.add_argument(
        "--concurrency",
        nargs="+",
        type=positive,
        metavar="N",
        help="requests in flight, one level per value (default: 1 4)",
    )
    endpoint.add_argument("--requests", type=positive, metavar="N", help="per variant and level (default: 20)")
    endpoint.add_argument("--max-tokens", type=positive, metavar="N", help="per request (default: 128)")
    endpoint.add_argument("--prompt", help="the user message (default: a one-paragraph question)")
    endpoint.add_argument("--config", type=Path, help="a moa.toml: also measure a preset against its aggregator alone")
    endpoint.add_argument("--preset", help="which preset of --config (default: the first)")

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
        return _bench(args, argv, bench)
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


BENCH_SECTIONS = ("chunks", "sinks", "concurrency", "fanout", "responses", "calls", "store")
"""The sections of `moa_stream.benchmarks.suite`, named here so that `--help` does not import the suite."""


_BENCH_ABOUT = (
    "Without --base-url: the benchmark suite against the embedded simulator (per-chunk cost, sinks on/off, "
    "concurrency, fan-out, the Responses API, per-call cost). With --base-url and --model: the bare SDK, the "
    "wrapped client and fast mode against that OpenAI-compatible endpoint, side by side (TTFT, ITL, TPOT, "
    "end-to-end latency, tokens/s, requests/s, client CPU), and with --config a preset against its aggregator "
    "alone. Prints tables and writes JSON (and PNG plots with matplotlib) to --out-dir."
)
_ENDPOINT_OPTIONS = ("model", "api_key_env", "concurrency", "requests", "max_tokens", "prompt", "config", "preset")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def bench_out_dir(module: types.ModuleType) -> Path:
    """Where results go by default: `benchmarks/results` of a source checkout (when `module`, one of
    the benchmarks, was imported from `benchmarks/` there), else `./moa-stream-bench`, never into the
    installed package."""
    package = Path(module.__file__ or "").resolve().parent
    root = package.parent
    if package.name == "benchmarks" and (root / "pyproject.toml").is_file() and (root / "moa_stream").is_dir():
        return package / "results"
    return Path("moa-stream-bench")


def _bench(args: argparse.Namespace, argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> int:
    """The suite of `moa_stream.benchmarks`, or with --base-url the endpoint bench."""
    command = shlex.join(["moa-stream", *(sys.argv[1:] if argv is None else argv)])
    if args.base_url is None:
        given = [_flag(option) for option in _ENDPOINT_OPTIONS if getattr(args, option) is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --base-url (an endpoint to measure)")
        suite = importlib.import_module("moa_stream.benchmarks.suite")
        if args.out_dir is None:
            args.out_dir = bench_out_dir(suite)
        code: int = suite.run_command(args, command=command)
        return code
    if args.sections or args.quick:
        parser.error(
            "--sections and --quick choose what the suite runs; --base-url measures an endpoint instead "
            "(size it with --concurrency and --requests)"
        )
    if args.model is None:
        parser.error("--base-url needs --model, the model to ask the endpoint for")
    if args.preset is not None and args.config is None:
        parser.error("--preset needs --config, the moa.toml it is defined in")
    endpoint = importlib.import_module("moa_stream.benchmarks.endpoint")
    # The command goes into the JSON file: without a password the URL may carry.
    command = command.replace(args.base_url, endpoint.shown_url(args.base_url))
    options = {option: getattr(args, option) for option in _ENDPOINT_OPTIONS if getattr(args, option) is not None}
    if "concurrency" in options:
        options["concurrency"] = tuple(options["concurrency"])
    out_dir = args.out_dir or bench_out_dir(endpoint)
    try:
        config = endpoint.EndpointConfig(base_url=args.base_url, **options)
        endpoint.run(config, out_dir=out_dir, command=command)
    except endpoint.EndpointError as exc:
        print(f"moa-stream bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmoa-stream bench: interrupted", file=sys.stderr)
        return 130
    return 0


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
