"""What a sweep's records say: the tuning table (:func:`build_table`), the summary (:func:`summarize`,
:func:`format_summary`) and the plot (:func:`plot_sweep`). Pure functions of the progress log's records."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from codegen.build.config import TileConfig

from .choice import DEFAULT_MARGIN, Choice, choose  # noqa: F401  (DEFAULT_MARGIN: read from here by callers)
from .tables import Shape, m_bucket, new_table, table_key


@dataclass
class SweepRow:
    """One (shape, M) of a sweep's summary: what :func:`codegen.tune.choice.choose` made of its records."""

    shape: Shape
    m: int
    choice: Choice | None
    default_config: str
    measured: int
    failed: int

    @property
    def best(self) -> dict | None:
        """The chosen config's record under the primary routing (uniform when measured)."""
        return self.choice.record(self.choice.config) if self.choice else None

    @property
    def default(self) -> dict | None:
        """The heuristic default's record under the primary routing (None: not measured or not correct)."""
        return self.choice.record(self.default_config) if self.choice else None

    @property
    def routings(self) -> tuple[str, ...]:
        return self.choice.routings if self.choice else ("uniform",)

    @property
    def gain(self) -> float | None:
        """The default's worst ratio over the chosen config's (one routing: default time / chosen time)."""
        if not self.choice or not self.choice.eligible(self.default_config):
            return None
        return self.choice.worst_ratio(self.default_config) / self.choice.worst_ratio(self.choice.config)


def _family(record: dict) -> str:
    """The kernel family (activations) of a record's config; "bf16" for a name that does not parse."""
    try:
        return TileConfig.from_name(str(record.get("config"))).activations
    except ValueError:
        return "bf16"


def _choose(ok: list[dict], m: int, activations: str = "bf16") -> tuple[Choice | None, str]:
    """(the rule's choice among the ``ok`` records of one (shape, M), the heuristic default's name at ``m``)."""
    from .selection import heuristic_config

    default_name = heuristic_config(m, activations).name
    return choose(ok, default_name), default_name


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
            choice, default_name = _choose([r for r in mine if r.get("status") == "ok"], m, activations)
            rows.append(SweepRow(shape, m, choice, default_name, len(mine), sum(r.get("status") != "ok" for r in mine)))
    return rows


def build_table(records: list[dict], gpu: str, base: dict | None = None) -> dict[str, Any]:
    """The tuning table of every ``ok`` record of ``gpu``: per (shape, M bucket) the config
    :func:`codegen.tune.choice.choose` picks over the routings measured.

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
        choice, _ = _choose(by_shape_m[(shape_key, m)], m, _family(by_shape_m[(shape_key, m)][0]))
        if choice is not None:  # None: no config is correct under every routing measured
            table["entries"].setdefault(shape_key, {})[str(bucket)] = table_entry(choice, m)
    return table


def table_entry(choice: Choice, m: int) -> dict[str, Any]:
    """A table entry: the chosen config and, under the primary routing, its time, rates and the default's
    time; when the routings measured are not just uniform, also ``routings`` (per routing: the chosen
    config's time, the best time and config, the default's time) and the chosen config's ``worst_ratio``."""
    best, default = choice.record(choice.config), choice.record(choice.default_config)
    entry = {
        "config": choice.config,
        "m": m,
        "median_us": round(best["median_us"], 3),
        "tflops": _significant(best.get("tflops") or 0.0),
        "gbps": _significant(best.get("gbps") or 0.0),
        "default_config": choice.default_config,
        "default_us": round(default["median_us"], 3) if default else None,
    }
    if choice.routings != ("uniform",):
        entry["routings"] = {routing: _routing_times(choice, routing) for routing in choice.routings}
        entry["worst_ratio"] = round(choice.worst_ratio(choice.config), 4)
    return entry


def _routing_times(choice: Choice, routing: str) -> dict[str, Any]:
    default = choice.record(choice.default_config, routing)
    return {
        "us": round(choice.record(choice.config, routing)["median_us"], 3),
        "best_us": round(choice.best_us[routing], 3),
        "best_config": choice.best_config(routing),
        "default_us": round(default["median_us"], 3) if default else None,
    }


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _us(record: dict | None, missing: str = "-") -> str:
    return f"{record['median_us']:.1f}" if record else missing


def _summary_cells(row: SweepRow, extra: Sequence[str]) -> dict[str, str]:
    """One summary line by column; ``extra``: the routings after the primary one (their columns)."""
    best, default, choice = row.best, row.default, row.choice
    cells = {
        "shape": row.shape.label, "M": str(row.m),
        "best config": best["config"] if best else f"(none of {row.measured} valid)",
        "us": _us(best), "TFLOP/s": f"{best['tflops']:.3g}" if best else "-",
        "GB/s": f"{best['gbps']:.4g}" if best else "-", "default config": row.default_config,
        "default us": _us(default, "failed/untimed"), "gain": f"{row.gain:.2f}x" if row.gain else "-",
    }
    for routing in extra:
        mine = choice.record(choice.config, routing) if choice else None
        cells[f"{routing} us"] = _us(mine)
        cells[f"{routing}/{row.routings[0]}"] = f"{mine['median_us'] / best['median_us']:.2f}x" if mine else "-"
        cells[f"default {routing} us"] = _us(choice.record(row.default_config, routing) if choice else None)
    if extra:
        cells["worst ratio"] = f"{choice.worst_ratio(choice.config):.3f}" if choice else "-"
    return cells


def format_summary(rows: list[SweepRow]) -> str:
    """The summary table: per (shape, M) the chosen config and the default. When the sweep measured several
    routings, the primary routing's columns come first, then per other routing the chosen config's time, its
    slowdown over the primary routing (issue 21's Zipf / uniform) and the default's time, then the chosen
    config's worst ratio (time / the best time under that routing); the gain is then the default's worst ratio
    over the chosen one's."""
    routings = max((row.routings for row in rows), key=len, default=("uniform",))
    extra = routings[1:]
    header = ["shape", "M", "best config", "us", *(f"{r}{c}" for r in extra for c in (" us", f"/{routings[0]}")),
              "TFLOP/s", "GB/s", "default config", "default us", *(f"default {r} us" for r in extra),
              *(["worst ratio"] if extra else []), "gain"]
    lines = [[_summary_cells(row, extra).get(column, "-") for column in header] for row in rows]
    if extra:
        header[3] = f"{routings[0]} us"
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    left = {0, 2, header.index("default config")}
    fmt = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(line) for line in lines)])


def _curves(rows: Sequence[SweepRow]) -> list[tuple[str, Callable[[SweepRow], dict | None], str]]:
    """(label, the record a row plots, line style): best and default, and both again per other routing."""
    curves = [("best", lambda r: r.best, "o-"), ("default", lambda r: r.default, "s--")]
    for routing in max((row.routings for row in rows), key=len, default=("uniform",))[1:]:
        curves += [
            (f"best, {routing}", lambda r, x=routing: r.choice.record(r.choice.config, x) if r.choice else None, "o:"),
            (f"default, {routing}", lambda r, x=routing: r.choice.record(r.default_config, x) if r.choice else None, "s:"),
        ]
    return curves


def plot_sweep(rows: list[SweepRow], path: Path | str, title: str = "") -> Path | None:
    """Time vs M per shape, best vs default (per routing measured), as a PNG; None (with a message) without
    matplotlib."""
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
        for label, pick, style in _curves(mine):
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
