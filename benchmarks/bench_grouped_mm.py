"""The grouped-GEMM suite: ours vs humming vs bf16 ``torch._grouped_mm``, side by side in one run.

    python -m codegen bench [--quick] [--model M] [--m 1,16] [--routing zipf] [--out DIR]
    python -m benchmarks [--quick]                         (from a checkout)

For gpt-oss-20b and -120b (gate_up N=5760, down N=2880, K=2880) at M tokens per expert, uniform
and Zipf routing (top-4, loads ∝ 1/rank^1.1): every path's output is checked on sampled rows
against a float64 reference of the MXFP4 GEMM (a wrong path is reported, not timed), then timed as
CUDA-graph replay, eager back-to-back and device time. The floors come from the same run:
``torch.sum`` read bandwidth and the bf16 ``torch.matmul`` peak.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import measure, peers
from .problems import (
    MODEL_SHAPES,
    TOLERANCE,
    Row,
    make_row,
    memory_needed,
    offsets_from_loads,
    routings,
    sample_rows,
)
from .report import annotate, format_table, plot, write_json


@dataclass
class Settings:
    quick: bool = False
    graph: bool = True
    watchdog: float = 300.0
    seed: int = 0
    skip: dict[str, str] = field(default_factory=dict)  # path -> why it does not run


@dataclass
class Machine:
    """This GPU's measured floors (same run) and what it is."""

    name: str
    capability: tuple[int, int]
    read: Any  # codegen.tune.timing.MachineRate
    peak: Any

    @classmethod
    def measure(cls) -> "Machine":
        from codegen.tune.timing import measure_bf16_peak, measure_hbm_read_bandwidth

        return cls(torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability()),
                   measure_hbm_read_bandwidth(), measure_bf16_peak())

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.name, "capability": list(self.capability), "torch": torch.__version__,
                "python": platform.python_version(), "hbm_read": self.read.as_dict(), "bf16_peak": self.peak.as_dict()}

    def line(self) -> str:
        return (f"{self.name}: torch.sum reads {self.read.value / 1e12:.2f} TB/s; bf16 peak "
                f"{self.peak.value / 1e12:.0f} TFLOP/s (measured in this run)")


def operands(row: Row, packed: Any, dequantized: torch.Tensor, *, seed: int) -> peers.Operands:
    from codegen.tune.timing import l2_cache_bytes

    generator = torch.Generator(device=packed.data.device).manual_seed(seed)
    x = torch.randn((row.tokens, row.shape.k), generator=generator, device=packed.data.device, dtype=torch.bfloat16)
    offsets = torch.tensor(offsets_from_loads(row.loads), dtype=torch.int32, device=x.device)
    budget = min(4 << 30, int(torch.cuda.mem_get_info()[0] * 0.15))
    return peers.Operands(packed, dequantized, x, offsets, row.nbytes, l2_cache_bytes(), budget)


def check_and_time(prepared: peers.Prepared, index: torch.Tensor, ref: torch.Tensor, settings: Settings,
                   tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The float64 check on the sampled rows, then (if right) graph / eager / device times."""
    out = prepared.fn(*prepared.arg_sets[0])
    rel = measure.rel_error(out[index], ref)
    del out
    result: dict[str, Any] = {"rel_error": rel, "note": prepared.note, "copies": len(prepared.arg_sets)}
    if not rel <= tolerance:
        result["error"] = f"wrong result: rel. error {rel:.2e} vs float64 (> {tolerance:g}); not timed"
        return result
    result.update(measure.time_all(prepared.fn, prepared.arg_sets, graph=settings.graph, quick=settings.quick))
    return result


def run_path(path: str, ops: Any, index: torch.Tensor, ref: torch.Tensor, settings: Settings,
             prepare: Callable[[Any], peers.Prepared], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """One path of one row; errors are recorded. A lost CUDA context raises RuntimeError."""
    if path in settings.skip:
        return {"error": settings.skip[path]}
    try:
        return check_and_time(prepare(ops), index, ref, settings, tolerance)
    except peers.Unavailable as error:
        return {"error": f"{path} unavailable: {error}"}
    except Exception as error:
        if not measure.healthy():
            raise RuntimeError(f"the CUDA context is unusable after {path} failed: {measure.error_text(error)}") from error
        return {"error": measure.error_text(error)}
    finally:
        torch.cuda.empty_cache()


def run_row(row: Row, packed: Any, dequantized: torch.Tensor, humming_layer: Any, settings: Settings, save: Callable) -> None:
    ops = operands(row, packed, dequantized, seed=settings.seed + row.m)
    index, ref = measure.reference_rows(ops.x, dequantized, sample_rows(row.loads, seed=settings.seed))
    prepare = dict(peers.PREPARE)
    prepare["humming"] = lambda o: peers.prepare_humming(o, humming_layer)
    for path in peers.PATHS:
        with measure.Watchdog(settings.watchdog, save):
            row.results[path] = run_path(path, ops, index, ref, settings, prepare[path])


def humming_for(packed: Any, settings: Settings) -> Any:
    """The transformed humming layer of this weight (built once per shape), or None with skip set."""
    if "humming" in settings.skip:
        return None
    try:
        return peers.humming_layer(packed)
    except Exception as error:  # recorded per row as "humming unavailable: why"
        settings.skip["humming"] = f"humming unavailable: building its layer failed: {measure.error_text(error)}"
        print(f"bench: {settings.skip['humming']}", file=sys.stderr)
        return None


def rows_for_shape(model: str, projection: str, shape: Any, m_values: list[int], routings: list[str],
                   settings: Settings, skipped: list[str]) -> list[Row]:
    free = torch.cuda.mem_get_info()[0]
    rows = []
    for m in m_values:
        need = memory_needed(shape, shape.num_experts * m)
        if need > 0.9 * free:
            skipped.append(f"{model} {projection} M={m}: needs ~{need / 2**30:.0f} GiB, more than 90% of the free memory")
            continue
        rows.extend(make_row(model, projection, shape, routing, m, seed=settings.seed) for routing in routings)
    return rows


def run_shape(model: str, projection: str, shape: Any, rows: list[Row], settings: Settings, save: Callable) -> None:
    from codegen.tune.sweep import random_weights

    print(f"bench: {model} {projection} ({shape.label}): building weights", file=sys.stderr)
    packed, dequantized = random_weights(shape, torch.device("cuda"), seed=settings.seed)
    layer = humming_for(packed, settings)
    for row in rows:
        print(f"bench: {model} {projection} M={row.m} {row.routing}", file=sys.stderr)
        run_row(row, packed, dequantized, layer, settings, save)
    del packed, dequantized, layer
    torch.cuda.empty_cache()


def run(args: argparse.Namespace, m_values: list[int]) -> int:
    """The suite for parsed arguments (``benchmarks.cli`` checked them); 1 if the CUDA context was lost."""
    settings = Settings(quick=args.quick, graph=not args.no_graph, watchdog=args.watchdog, seed=args.seed)
    reason = "skipped (--no-humming)" if args.no_humming else peers.humming_unavailable()
    if reason:
        settings.skip["humming"] = reason if args.no_humming else f"humming unavailable: {reason}"
        print(f"bench: {settings.skip['humming']}", file=sys.stderr)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = Machine.measure()
    print(f"bench: {machine.line()}", file=sys.stderr)
    models = args.model or (["gpt-oss-20b"] if args.quick else sorted(MODEL_SHAPES))
    routing_kinds = routings(args.routing)
    started, rows, skipped = time.time(), [], []

    def save(partial: bool = False) -> Path:
        payload = {**machine.as_dict(), "suite": "grouped_mm", "m_values": m_values, "skipped": skipped,
                   "humming": settings.skip.get("humming") or peers.humming_version(), "partial": partial,
                   "seconds": round(time.time() - started, 1), "rows": [row.as_dict() for row in rows]}
        return write_json(out_dir / "bench_grouped_mm.json", payload)

    lost = _run_plan(models, m_values, routing_kinds, settings, rows, skipped, save)
    annotate(rows, machine.read.value, machine.peak.value)
    path = save(partial=lost)
    png = plot(rows, out_dir / "bench_grouped_mm.png", machine.line()) if rows and args.plot else None
    print(f"bench: wrote {path}" + (f" and {png}" if png else ""), file=sys.stderr)
    _print_summary(machine, settings, skipped, rows, time.time() - started)
    return 1 if lost else 0


def _run_plan(models: list[str], m_values: list[int], routings: list[str], settings: Settings,
              rows: list[Row], skipped: list[str], save: Callable) -> bool:
    """Every (model, projection): its rows; True when the CUDA context was lost (the run stops)."""
    for model in models:
        for projection, shape in MODEL_SHAPES[model].items():
            shape_rows = rows_for_shape(model, projection, shape, m_values, routings, settings, skipped)
            rows.extend(shape_rows)
            try:
                run_shape(model, projection, shape, shape_rows, settings, save)
            except RuntimeError as error:
                print(f"bench: {error}; stopping", file=sys.stderr)
                return True
    return False


def _print_summary(machine: Machine, settings: Settings, skipped: list[str], rows: list[Row], seconds: float) -> None:
    print(f"device: {machine.line()}; {seconds:.0f} s")
    humming = settings.skip.get("humming")
    print(humming if humming else f"humming: {peers.humming_version()} (grouped_contiguous, default SM90 table)")
    for note in skipped:
        print(f"skipped: {note}")
    print("times in us; graph = CUDA-graph replay per call, eager = back-to-back Python calls, device = kernel "
          "events; %floor = (bytes / torch.sum read BW) / graph time; ratios = ours' graph time / the peer's")
    print(format_table(rows))
