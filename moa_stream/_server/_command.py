"""`moa-stream serve`: the command line around the app and the runner."""

from __future__ import annotations

import argparse
import copy
import getpass
import ipaddress
import os
import signal
import sys
from pathlib import Path
from typing import Any

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
from ._keys import KeyRing, token_digest
from ._runner import Server

_KEYS_HELP = """\
keys file (--keys FILE), TOML; digests only, never tokens:

  [keys.alice]
  sha256 = "<hex sha256 of alice's token>"   # moa-stream serve --hash-token prints this line
  [keys.alice.budget]                        # optional: over all of alice's sessions together
  calls = 100                                # also cost_usd, input_tokens, output_tokens, total_tokens
  cost_usd = 5.0

Key ids are 1 to 64 of A-Z a-z 0-9 _ -. A request's session S (its X-MoA-Session header, else
"default") is session <key id>.S: no key reaches another's sessions. SIGHUP reloads the file: a key
removed from it is refused from then on; a file with a problem is logged and the old keys stay.
"""


def add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve` to the `moa-stream` subcommands (run it with `run_serve(args)`)."""
    serve = commands.add_parser(
        "serve",
        help="serve presets over an OpenAI-compatible HTTP endpoint",
        description=(
            "Serve /v1/chat/completions and /v1/responses (SSE and JSON; retrieve and cancel by id too) and\n"
            "/v1/models: the presets as moa:<name> plus the upstream's models, every call metered. Needs the\n"
            "server extra: pip install 'moa-stream[server]'.\n"
            "\n"
            'GET /health answers 200 {"status": "ok", "version": "<moa-stream version>", "store": "memory"\n'
            'or "shared"} while the server runs, for load balancers: no token needed, and nothing is asked of\n'
            "the upstream or the store (their outages show as errors on the calls)."
        ),
        epilog=_KEYS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    who = serve.add_mutually_exclusive_group()
    who.add_argument(
        "--token-env", metavar="NAME", help="environment variable holding the bearer token clients must send"
    )
    who.add_argument(
        "--keys",
        type=Path,
        metavar="FILE",
        help="a keys file: the clients' tokens (as digests), each a key with its own sessions and budget",
    )
    serve.add_argument(
        "--hash-token",
        action="store_true",
        help="read a token from stdin, print its line for a keys file, and exit",
    )
    serve.add_argument("--trace-dir", type=Path, help="write one trace line per turn under this directory")
    serve.add_argument(
        "--store",
        metavar="URL",
        help="a Redis URL (redis://host:port/db): sessions, budgets and reference caches shared by every "
        "replica with the same store (default: the [store] table of --config, else in this process)",
    )
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
        help=f"requests in flight per client: its key, else its address (default: {DEFAULT_MAX_CONCURRENT_PER_CLIENT})",
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
    """Run `moa-stream serve` until SIGINT or SIGTERM (SIGHUP reloads `--keys`); the exit status."""
    if args.hash_token:
        return _hash_token()
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
        keys = KeyRing.load(args.keys) if args.keys is not None else None
        anyio.run(_serve_command, args, token, keys)
    except (_UsageError, ConfigError) as exc:
        print(f"moa-stream serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the address is taken, or not ours
        print(f"moa-stream serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _hash_token() -> int:
    # Not echoed at a terminal, and never in argv, where other users' `ps` would show it.
    token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    # Stripped as the server strips the token of an Authorization header.
    token = token.strip()
    if not token:
        print("moa-stream serve --hash-token: no token on stdin", file=sys.stderr)
        return 2
    print(f'sha256 = "{token_digest(token)}"')
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


async def _serve_command(args: argparse.Namespace, token: str | None, keys: KeyRing | None) -> None:
    from .._wrap import wrap

    client = wrap(_upstream(args), config=args.config, trace_dir=args.trace_dir, store=args.store)
    try:
        app = create_app(
            client,
            token=token,
            keys=keys,
            max_body_bytes=args.max_body_bytes,
            max_concurrent_per_client=args.max_concurrent_per_client,
        )
        if token is None and keys is None and not is_loopback(args.host):
            print(
                f"moa-stream serve: warning: {args.host} is not a loopback address and neither --token-env nor "
                "--keys is set; anyone who can reach it can spend your upstream's credits",
                file=sys.stderr,
            )
        # Without --keys, SIGHUP keeps its default (the server stops): there is nothing to reload.
        wanted = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if keys is not None else ())
        with anyio.open_signal_receiver(*wanted) as signals:
            server = Server(app, host=args.host, port=args.port, log_config=_log_config(), access_log=True)
            async with server:
                models = ", ".join(f"{MOA_PREFIX}{name}" for name in preset_names(client)) or "none"
                upstream = args.base_url or "the embedded simulator"
                who = f"keys: {len(keys.ids)} from {args.keys}; " if keys is not None else ""
                print(
                    f"moa-stream serving on {server.base_url} (upstream: {upstream}; presets: {models}; "
                    f"{who}Ctrl-C stops it)",
                    file=sys.stderr,
                    flush=True,
                )
                async for signum in signals:
                    if signum != signal.SIGHUP or keys is None:
                        break
                    await keys.reload()
    finally:
        await client.close()  # idempotent: the app's lifespan closed it unless startup failed


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, and the server's own messages (a reload of the keys) beside its lines."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["moa_stream.server"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
