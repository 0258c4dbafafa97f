"""`moa-stream serve`: the command line around the app and the runner."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from pathlib import Path

import anyio
import openai

from .._errors import ConfigError
from .._moa import MOA_PREFIX
from ._app import create_app, preset_names
from ._asgi import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_PER_CLIENT,
    DEFAULT_PORT,
)
from ._runner import Server


def add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve` to the `moa-stream` subcommands (run it with `run_serve(args)`)."""
    serve = commands.add_parser(
        "serve",
        help="serve presets over an OpenAI-compatible HTTP endpoint",
        description=(
            "Serve /v1/chat/completions and /v1/responses (SSE and JSON; retrieve and cancel by id too) and "
            "/v1/models: the presets as moa:<name> plus the upstream's models, every call metered. Needs the "
            "server extra: pip install 'moa-stream[server]'."
        ),
    )
    serve.add_argument("--config", type=Path, help="a moa.toml with [presets.<name>] tables")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default: {DEFAULT_PORT})")
    serve.add_argument("--base-url", help="an OpenAI-compatible upstream (default: the embedded simulator)")
    serve.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="environment variable holding the upstream's API key (default: OPENAI_API_KEY if set)",
    )
    serve.add_argument(
        "--token-env", metavar="NAME", help="environment variable holding the bearer token clients must send"
    )
    serve.add_argument("--trace-dir", type=Path, help="write one trace line per turn under this directory")
    serve.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"largest request body accepted (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    serve.add_argument(
        "--max-concurrent-per-client",
        type=_positive_int,
        default=DEFAULT_MAX_CONCURRENT_PER_CLIENT,
        metavar="N",
        help=f"requests in flight per client (default: {DEFAULT_MAX_CONCURRENT_PER_CLIENT})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _UsageError(Exception):
    """A command-line problem, reported in one line with exit status 2."""


def run_serve(args: argparse.Namespace) -> int:
    """Run `moa-stream serve` until SIGINT or SIGTERM; the exit status."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(
            f"moa-stream serve: needs the server extra ({exc.name} is missing): pip install 'moa-stream[server]'",
            file=sys.stderr,
        )
        return 2
    try:
        token = _read_env(args.token_env, "--token-env") if args.token_env else None
        anyio.run(_serve_command, args, token)
    except (_UsageError, ConfigError) as exc:
        print(f"moa-stream serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the address is taken, or not ours
        print(f"moa-stream serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _read_env(name: str, option: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise _UsageError(f"{option} {name}: that environment variable is not set or empty")
    return value


def _upstream(args: argparse.Namespace) -> openai.AsyncOpenAI:
    # The endpoint's own clients decide about retries: retrying here too would multiply them.
    if args.base_url is None:
        if args.api_key_env:
            raise _UsageError("--api-key-env needs --base-url (the embedded simulator takes no key)")
        from ..testing import default_simulator, sim_client

        return sim_client(default_simulator(), max_retries=0)
    key = _read_env(args.api_key_env, "--api-key-env") if args.api_key_env else os.environ.get("OPENAI_API_KEY")
    return openai.AsyncOpenAI(base_url=args.base_url, api_key=key or "none", max_retries=0)


async def _serve_command(args: argparse.Namespace, token: str | None) -> None:
    import uvicorn.config

    from .._wrap import wrap

    client = wrap(_upstream(args), config=args.config, trace_dir=args.trace_dir)
    try:
        app = create_app(
            client,
            token=token,
            max_body_bytes=args.max_body_bytes,
            max_concurrent_per_client=args.max_concurrent_per_client,
        )
        if token is None and not is_loopback(args.host):
            print(
                f"moa-stream serve: warning: {args.host} is not a loopback address and no --token-env is set; "
                "anyone who can reach it can spend your upstream's credits",
                file=sys.stderr,
            )
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            server = Server(
                app, host=args.host, port=args.port, log_config=uvicorn.config.LOGGING_CONFIG, access_log=True
            )
            async with server:
                models = ", ".join(f"{MOA_PREFIX}{name}" for name in preset_names(client)) or "none"
                upstream = args.base_url or "the embedded simulator"
                print(
                    f"moa-stream serving on {server.base_url} (upstream: {upstream}; presets: {models}; "
                    "Ctrl-C stops it)",
                    file=sys.stderr,
                    flush=True,
                )
                async for _ in signals:
                    break
    finally:
        await client.close()  # idempotent: the app's lifespan closed it unless startup failed


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
