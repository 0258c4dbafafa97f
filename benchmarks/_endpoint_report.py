"""What the endpoint bench prints and draws: the table's rows, the notes, the preset's TTFT against
its aggregator's alone, and the plot."""

from __future__ import annotations

from typing import Any

from ._common import SectionResult

FAST_SKIPPED = "fast: skipped, this moa_stream's wrap() has no `fast` keyword"

HEADERS = [
    "in flight",
    "variant",
    "ok",
    "TTFT p50",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "TPOT p50",
    "E2EL p50",
    "E2EL p99",
    "tok/s/req",
    "tok/s",
    "req/s",
    "CPU µs/chunk",
    "CPU ms/call",
]


def _figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def rows(entry: dict[str, Any]) -> list[list[str]]:
    """The table's rows for one level, a row per variant."""
    table = []
    for name, row in entry["variants"].items():
        table.append(
            [
                str(entry["concurrency"]),
                name,
                f"{row['ok']}/{row['requests']}",
                _figure(row["ttft_ms"]["p50"]),
                _figure(row["ttft_ms"]["p99"]),
                _figure(row["itl_ms"]["p50"], 2),
                _figure(row["itl_ms"]["p99"], 2),
                _figure(row["tpot_ms"]["p50"], 2),
                _figure(row["e2el_ms"]["p50"]),
                _figure(row["e2el_ms"]["p99"]),
                _figure(row["request_output_tokens_per_s"]["p50"]),
                _figure(row["output_tokens_per_s"]),
                _figure(row["requests_per_s"], 2),
                _figure(row["cpu_us_per_chunk"]),
                _figure(row["cpu_ms_per_call"], 2),
            ]
        )
    return table


def preset_comparison(levels: dict[str, dict[str, Any]], preset: str | None) -> dict[str, Any] | None:
    """Per level: the preset's TTFT against its aggregator's alone (p50 and p99, difference and ratio)."""
    if preset is None:
        return None
    comparison: dict[str, Any] = {"preset": f"moa:{preset}", "levels": {}}
    for key, entry in levels.items():
        ours, alone = entry["variants"][f"moa:{preset}"]["ttft_ms"], entry["variants"]["aggregator"]["ttft_ms"]
        row: dict[str, Any] = {}
        for q in ("p50", "p99"):
            row[f"preset_ttft_{q}_ms"], row[f"aggregator_ttft_{q}_ms"] = ours[q], alone[q]
            both = ours[q] is not None and alone[q] is not None
            row[f"added_ttft_{q}_ms"] = ours[q] - alone[q] if both else None
            row[f"ttft_{q}_ratio"] = ours[q] / alone[q] if both and alone[q] else None
        comparison["levels"][key] = row
    return comparison


def notes(levels: dict[str, dict[str, Any]], *, preset: str | None, requests: int, fast_mode: bool) -> list[str]:
    """What the reader needs besides the table: the definitions in short, and anything unusual."""
    found = [
        "ms unless named; TTFT to the first chunk with text, ITL between chunks with text, TPOT = (E2EL - TTFT) / "
        "(tokens - 1), E2EL to the end of the stream; tok/s/req = tokens / E2EL (p50); tok/s and req/s over the "
        "variant's wall time at the level; CPU = process_time over its blocks, with the flush of its events"
    ]
    if not fast_mode:
        found.append(FAST_SKIPPED)
    for key, entry in levels.items():
        for name, row in entry["variants"].items():
            tokens = row["output_tokens"]
            if tokens["from_chunks"]:
                found.append(
                    f"{name} at {key}: {tokens['from_chunks']} of {row['ok']} streams had no usage chunk; their "
                    "tokens are the chunks that carried text"
                )
            if row["errors"]:
                failed = f"{row['errors']} of {row['requests']} failed"
                found.append(f"{name} at {key}: {failed}; first: {row['first_error']}")
    low = [key for key, entry in levels.items() if entry["concurrency"] > requests]
    if low:
        found.append(f"at {', '.join(low)} in flight, at most {requests} were (--requests per variant and level)")
    comparison = preset_comparison(levels, preset)
    if comparison is not None:
        for key, row in comparison["levels"].items():
            if row["added_ttft_p50_ms"] is not None:
                found.append(
                    f"moa:{preset} at {key} in flight: TTFT p50 {row['preset_ttft_p50_ms']:,.1f} ms against "
                    f"{row['aggregator_ttft_p50_ms']:,.1f} ms for its aggregator alone "
                    f"({row['added_ttft_p50_ms']:+,.1f} ms, x{row['ttft_p50_ratio']:.2f})"
                )
    return found


def plot(result: SectionResult, plt: Any, *, title: str) -> Any:
    """TTFT, ITL (p50 solid, p99 dashed), aggregate output tokens/s and CPU per chunk, against the level."""
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    levels = result.results["levels"]
    x = [entry["concurrency"] for entry in levels.values()]
    names = list(next(iter(levels.values()))["variants"])
    for index, name in enumerate(names):
        series = [entry["variants"][name] for entry in levels.values()]
        color = f"C{index}"
        for metric, ax in (("ttft_ms", axes[0][0]), ("itl_ms", axes[0][1])):
            ax.plot(x, [row[metric]["p50"] for row in series], marker="o", color=color, label=name)
            ax.plot(x, [row[metric]["p99"] for row in series], marker="x", linestyle="--", color=color)
        axes[1][0].plot(x, [row["output_tokens_per_s"] for row in series], marker="o", color=color, label=name)
        axes[1][1].plot(x, [row["cpu_us_per_chunk"] for row in series], marker="o", color=color, label=name)
    labels = ("TTFT ms (p50, p99 dashed)", "ITL ms (p50, p99 dashed)", "output tokens/s (all requests)", "CPU µs/chunk")
    for ax, label in zip([*axes[0], *axes[1]], labels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(level) for level in x])
        ax.set_xlabel("requests in flight")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    figure.suptitle(f"{title}\n{result.config['model']} at {result.config['base_url']}")
    return figure
