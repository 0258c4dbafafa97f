"""Run the sections of the suite against one simulator subprocess; print, write JSON, plot."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import calls, chunks, concurrency, fanout, responses, sinks, store
from ._common import (
    RESULTS_DIR,
    Config,
    Section,
    SectionResult,
    SimProcess,
    print_section,
    pyplot,
    raise_fd_limit,
    save_figure,
    write_json,
)

SECTIONS: dict[str, Section] = {
    section.name: section
    for section in (
        chunks.SECTION,
        sinks.SECTION,
        concurrency.SECTION,
        fanout.SECTION,
        responses.SECTION,
        calls.SECTION,
        store.SECTION,
    )
}
NO_MATPLOTLIB = "matplotlib is not installed, so no PNG plots (install the package's `bench` extra)"


def run_suite(
    sections: Sequence[str] | None = None,
    *,
    quick: bool = False,
    out_dir: Path = RESULTS_DIR,
    config: Config | None = None,
    command: str | None = None,
) -> list[SectionResult]:
    """Run `sections` (default: all, in order) and write their results to `out_dir`."""
    names = list(sections or SECTIONS)
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; the sections are {list(SECTIONS)}")
    config = config or (Config.quick_run() if quick else Config.full())
    raise_fd_limit()
    plt = pyplot()
    results = []
    with (
        SimProcess(m for name in names for m in SECTIONS[name].models(config)) as sim,
        tempfile.TemporaryDirectory(prefix="moa-bench-") as scratch,
    ):
        for name in names:
            section = SECTIONS[name]
            started = time.perf_counter()
            result = asyncio.run(section.run(sim.base_url, config, Path(scratch) / name))
            result.elapsed_s = time.perf_counter() - started
            print_section(result)
            written = [write_json(result, out_dir, extra={"command": command, "quick": config.quick})]
            if plt is not None:
                written.append(save_figure(plt, section.plot(result, plt), out_dir / f"{name}.png"))
            print("written: " + ", ".join(str(path) for path in written), flush=True)
            results.append(result)
    if plt is None:
        print(f"\nnote: {NO_MATPLOTLIB}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `moa-stream bench` and `python -m benchmarks`."""
    parser.add_argument("--quick", action="store_true", help="few rounds and small sizes (under a minute)")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=list(SECTIONS),
        metavar="SECTION",
        help=f"any of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where JSON and PNG files go (default: ./moa-stream-bench)",
    )


def run_command(args: argparse.Namespace, *, command: str) -> int:
    """Run the suite as parsed by `add_arguments`; `command` is recorded in the JSON files."""
    started = time.perf_counter()
    run_suite(args.sections, quick=args.quick, out_dir=args.out_dir, command=command)
    print(f"\nsuite done in {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks [--quick] [--sections ...] [--out-dir DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="the moa_stream benchmark suite")
    add_arguments(parser)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args, command=command)
