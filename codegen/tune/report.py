"""What a sweep's records say: the tuning table (:func:`build_table`), the summary (:func:`summarize`,
:func:`format_summary`) and the plot (:func:`plot_sweep`). Pure functions of the progress log's records."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from codegen.build.config import TileConfig

from .tables import Shape, m_bucket, new_table, table_key


@dataclass
class SweepRow:
    shape: Shape
    m: int
    best: dict | None
    default_config: str
    default: dict | None
    measured: int
    failed: int

    @property
    def gain(self) -> float | None:
        if not self.best or not self.default:
            return None
        return self.default["median_us"] / self.best["median_us"]


def _family(record: dict) -> str:
    """The kernel family (activations) of a record's config; "bf16" for a name that does not parse."""
    try:
        return TileConfig.from_name(str(record.get("config"))).activations
    except ValueError:
        return "bf16"


# Timings of one config repeated on one GPU spread by about 1% (benchmarks/NOTES.md), so a config
# displaces the heuristic default only when it is more than 2% faster: a table entry is then a
# measured gain, not noise, and a re-tune does not churn configs that tie.
DEFAULT_MARGIN = 1.02


def _best_and_default(ok: list[dict], m: int, activations: str = "bf16") -> tuple[dict | None, str, dict | None]:
    """(the chosen ``ok`` record: the fastest, or the heuristic default when that is within
    DEFAULT_MARGIN of it; the heuristic default's name at ``m``; the default's record)."""
    from .selection import heuristic_config

    best = min(ok, key=lambda r: r["median_us"]) if ok else None
    default_name = heuristic_config(m, activations).name
    default = next((r for r in ok if r["config"] == default_name), None)
    if best is not None and default is not None and default["median_us"] <= best["median_us"] * DEFAULT_MARGIN:
        best = default
    return best, default_name, default


def summarize(records: list[dict], shapes: Sequence[Shape], m_values: Sequence[int], gpu: str,
              activations: str = "bf16") -> list[SweepRow]:
    rows = []
    for shape in shapes:
        for m in m_values:
            mine = [
                r for r in records
                if r.get("gpu") == gpu and (r.get("E"), r.get("N"), r.get("K"), r.get("m")) == (shape.num_experts, shape.n, shape.k, m)
                and _family(r) == activations
            ]
            best, default_name, default = _best_and_default([r for r in mine if r.get("status") == "ok"], m, activations)
            rows.append(SweepRow(shape, m, best, default_name, default, len(mine), sum(r.get("status") != "ok" for r in mine)))
    return rows


def build_table(records: list[dict], gpu: str, base: dict | None = None) -> dict[str, Any]:
    """The tuning table of every ``ok`` record of ``gpu``: the fastest config per (shape, M bucket).

    When several measured M values share a bucket, the largest M (nearest the bucket's top) speaks
    for it. ``base`` (an existing table of the same GPU) keeps its other entries.
    """
    table = new_table(gpu)
    if base and base.get("gpu") == gpu and isinstance(base.get("entries"), dict):
        table["entries"] = {shape: dict(buckets) for shape, buckets in base["entries"].items()}
    ok = [r for r in records if r.get("gpu") == gpu and r.get("status") == "ok" and r.get("median_us")]
    by_shape_m: dict[tuple[str, int], list[dict]] = {}
    for r in ok:  # W4A8 records under "E,N,K:fp8" (tuning.table_key)
        key = table_key(Shape(int(r["E"]), int(r["N"]), int(r["K"])), _family(r))
        by_shape_m.setdefault((key, int(r["m"])), []).append(r)
    chosen: dict[tuple[str, int], int] = {}
    for shape_key, m in by_shape_m:
        bucket = m_bucket(m)
        if m > chosen.get((shape_key, bucket), 0):
            chosen[(shape_key, bucket)] = m
    for (shape_key, bucket), m in sorted(chosen.items()):
        best, default_name, default = _best_and_default(by_shape_m[(shape_key, m)], m, _family(by_shape_m[(shape_key, m)][0]))
        table["entries"].setdefault(shape_key, {})[str(bucket)] = {
            "config": best["config"],
            "m": m,
            "median_us": round(best["median_us"], 3),
            "tflops": _significant(best.get("tflops") or 0.0),
            "gbps": _significant(best.get("gbps") or 0.0),
            "default_config": default_name,
            "default_us": round(default["median_us"], 3) if default else None,
        }
    return table


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def format_summary(rows: list[SweepRow]) -> str:
    header = ("shape", "M", "best config", "us", "TFLOP/s", "GB/s", "default config", "default us", "gain")
    lines = []
    for row in rows:
        best, default = row.best, row.default
        lines.append((
            row.shape.label,
            str(row.m),
            best["config"] if best else f"(none of {row.measured} valid)",
            f"{best['median_us']:.1f}" if best else "-",
            f"{best['tflops']:.3g}" if best else "-",
            f"{best['gbps']:.4g}" if best else "-",
            row.default_config,
            f"{default['median_us']:.1f}" if default else "failed/untimed",
            f"{row.gain:.2f}x" if row.gain else "-",
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 2, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(line) for line in lines)])


def plot_sweep(rows: list[SweepRow], path: Path | str, title: str = "") -> Path | None:
    """Time vs M per shape, best vs default, as a PNG; None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tune: matplotlib is not installed; skipping the plot (pip install 'hopper-mxfp4[bench]')", file=sys.stderr)
        return None
    shapes = list(dict.fromkeys(row.shape for row in rows))
    figure, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for axis, shape in zip(axes[0], shapes):
        mine = [row for row in rows if row.shape == shape]
        for label, pick, style in (("best", lambda r: r.best, "o-"), ("default", lambda r: r.default, "s--")):
            points = [(r.m, pick(r)["median_us"]) for r in mine if pick(r)]
            if points:
                axis.plot(*zip(*points), style, label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens per expert (M)")
        axis.set_ylabel("time (us)")
        axis.set_title(shape.label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
