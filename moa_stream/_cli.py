"""The `moa-stream` command: `demo` and `sim`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio


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

    sim = commands.add_parser("sim", help="serve the embedded simulator over HTTP")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        anyio.run(
            lambda: run_demo(
                base_url=args.base_url,
                api_key=args.api_key,
                models=args.model,
                aggregator=args.aggregator,
                config=args.config,
                preset=args.preset,
                trace_dir=args.trace_dir,
            )
        )
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_serve_simulator, args.host, args.port)
    return 0


async def _serve_simulator(host: str, port: int) -> None:
    from ._sim import default_simulator
    from ._sim_server import SimServer

    async with SimServer(default_simulator(), host=host, port=port) as server:
        print(f"simulator listening on {server.base_url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    raise SystemExit(main())
