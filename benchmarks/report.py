"""Derived columns, the text table, the JSON file and the optional PNG (CPU only, tested)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .peers import PATHS
from .problems import Row

TIMES = ("graph_us", "eager_us", "device_us")


def derived(result: dict[str, Any], nbytes: int, flops: int, read_bw: float, peak: float) -> dict[str, Any]:
    """On the graph-replay time (else eager): TB/s on the bytes that must move, the fraction of the
    memory floor (``bytes / read_bw`` over the time), TFLOP/s and its fraction of the bf16 peak."""
    us = result.get("graph_us") or result.get("eager_us")
    if not us:
        return {}
    seconds = us * 1e-6
    floor_us = nbytes / read_bw * 1e6 if read_bw > 0 else float("nan")
    return {
        "tbps": nbytes / seconds / 1e12,
        "floor_us": floor_us,
        "floor_fraction": floor_us / us,
        "tflops": flops / seconds / 1e12,
        "peak_fraction": flops / seconds / peak if peak > 0 else float("nan"),
    }


def ratio(results: dict[str, dict[str, Any]], mine: str, other: str, key: str) -> float | None:
    """``results[mine][key] / results[other][key]`` (a time ratio: < 1 means ``mine`` is faster)."""
    a, b = results.get(mine, {}).get(key), results.get(other, {}).get(key)
    return a / b if a and b else None


def annotate(rows: Sequence[Row], read_bw: float, peak: float) -> None:
    """Add the derived columns to every timed result and the ours/peer ratios to ours."""
    for row in rows:
        for result in row.results.values():
            result.update(derived(result, row.nbytes, row.flops, read_bw, peak))
        ours = row.results.get("ours")
        if ours is None:
            continue
        for peer, tag in (("humming", "humming"), ("torch bf16", "bf16")):
            for key in ("graph_us", "eager_us"):
                value = ratio(row.results, "ours", peer, key)
                if value is not None:
                    ours[f"ours/{tag} {key.split('_')[0]}"] = value


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _result_line(row: Row, path: str, result: dict[str, Any]) -> tuple[str, ...]:
    shape = f"{row.model} {row.projection}"
    routing = row.routing if row.routing == "uniform" else f"zipf (max {max(row.loads)})"
    if "error" in result:
        return (shape, routing, str(row.m), path, str(result["error"])[:70], *(["-"] * 9))
    percent = lambda v: None if v is None else 100 * v  # noqa: E731
    return (
        shape, routing, str(row.m), path, _cell(result.get("rel_error"), ".1e"),
        _cell(result.get("graph_us"), ".1f") if "graph_us" in result else "n/a",
        _cell(result.get("eager_us"), ".1f"), _cell(result.get("device_us"), ".1f"),
        _cell(result.get("tbps"), ".2f"), _cell(percent(result.get("floor_fraction")), ".0f"),
        _cell(result.get("tflops"), ".1f"), _cell(percent(result.get("peak_fraction")), ".0f"),
        _cell(result.get("ours/humming graph"), ".2f"), _cell(result.get("ours/bf16 graph"), ".2f"),
    )


HEADER = ("shape", "routing", "M", "path", "rel err", "graph us", "eager us", "device us", "TB/s", "%floor",
          "TFLOP/s", "%peak", "ours/hum", "ours/bf16")


def align(header: Sequence[str], lines: Sequence[Sequence[str]], left: set[int]) -> str:
    """Columns padded to their widest cell; ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def format_table(rows: Sequence[Row]) -> str:
    """One line per (row, path); times in µs; ratios are ours' time over the peer's (< 1: ours faster)."""
    lines = [_result_line(row, path, row.results[path]) for row in rows for path in PATHS if path in row.results]
    return align(HEADER, lines, {0, 1, 3, 4})


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def plot(rows: Sequence[Row], path: Path, title: str) -> Path | None:
    """Graph-replay µs against M per shape, solid uniform / dashed Zipf; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; skipping the plot (pip install 'hopper-mxfp4[bench]')",
              file=sys.stderr)
        return None
    panels = list(dict.fromkeys((row.model, row.projection) for row in rows))
    columns = min(2, len(panels))
    height = -(-len(panels) // columns)
    figure, axes = plt.subplots(height, columns, figsize=(6.5 * columns, 4.5 * height), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        _plot_panel(axis, [row for row in rows if (row.model, row.projection) == panel], panel)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_panel(axis: Any, rows: Sequence[Row], panel: tuple[str, str]) -> None:
    colours = {"ours": "tab:blue", "humming": "tab:red", "torch bf16": "tab:orange"}
    for routing, style in (("uniform", "-"), ("zipf", "--")):
        chosen = [row for row in rows if row.routing == routing]
        for name in PATHS:
            points = [(row.m, row.results[name]["graph_us"]) for row in chosen
                      if row.results.get(name, {}).get("graph_us")]
            if points:
                axis.plot(*zip(*points), style, marker="o", color=colours[name], label=f"{name} ({routing})")
        floor = [(row.m, row.results["ours"]["floor_us"]) for row in chosen if row.results.get("ours", {}).get("floor_us")]
        if floor and routing == "uniform":
            axis.plot(*zip(*floor), ":", color="black", label="memory floor")
    shape = rows[0].shape
    axis.set_title(f"{panel[0]} {panel[1]}: E={shape.num_experts} N={shape.n} K={shape.k}")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("tokens per expert (M)")
    axis.set_ylabel("graph replay (us)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
