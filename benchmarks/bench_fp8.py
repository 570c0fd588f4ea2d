"""The FP8 suite: ``hopper-mxfp4 bench fp8``. Our W4A16 and W4A8 kernels beside torch's FP8 grouped GEMM, bf16
torch and humming's FP8-input path (benchmarks/fp8_paths.py), then the accuracy table.

    python -m codegen bench fp8 [--quick] [--model M] [--m 1,16,256,1024,4096] [--routing uniform] [--out DIR]

gpt-oss-20b and -120b shapes (gate_up N=5760, down N=2880, K=2880), M tokens per expert. Every path's output
is checked on sampled rows against its float64 reference (the bf16 x, or the e4m3 x with its row scales)
before it is timed (CUDA-graph replay, eager, device). TFLOP/s and the fraction of the FP8 dense peak
(``torch._scaled_mm`` 8192^3, measured in the same run) are on the graph time; ``x W4A16`` is our W4A16 time
over the path's (> 1: faster). The accuracy table: per shape, our W4A8 output against our W4A16 output (the
bf16-activation result) and both against float64, on Gaussian and on heavy-tailed x (1 channel in 64 thirty
times larger), with the share of the weight's blocks the FP8-ready layout re-rounded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import fp8_paths, measure
from .bench_grouped_mm import Machine, Settings, rows_for_shape, run_path
from .fp8_paths import PATHS, REFERENCE, TOLERANCE
from .problems import MODEL_SHAPES, Row, offsets_from_loads, routings, sample_rows
from .report import align, derived, write_json

HEAVY_CHANNELS = 64  # one channel in 64 ...
HEAVY_FACTOR = 30.0  # ... this many times larger


def build_weights(shape: Any, settings: Settings, device: str = "cuda") -> fp8_paths.Weights:
    """The shape's random MXFP4 weight in every form the paths read (the same seed, the same values)."""
    from codegen.tune.sweep import random_weights

    device = torch.device(device)
    plain, dequantized = random_weights(shape, device, seed=settings.seed)
    ready, _ = random_weights(shape, device, seed=settings.seed, activations="fp8")
    fp8, fp8_scale = fp8_paths.torch_fp8_weights(dequantized)
    weights = fp8_paths.Weights(plain, ready, dequantized, fp8, fp8_scale)
    if "humming fp8" not in settings.skip:
        try:
            weights.humming = fp8_paths.humming_fp8_layer(plain)
        except Exception as error:  # recorded per row as "humming fp8 unavailable: why"
            settings.skip["humming fp8"] = f"humming fp8 unavailable: building its layer failed: {measure.error_text(error)}"
            print(f"bench: {settings.skip['humming fp8']}", file=sys.stderr)
    return weights


def operands(row: Row, weights: fp8_paths.Weights, seed: int) -> fp8_paths.Operands:
    import mxfp4
    from codegen.tune.timing import l2_cache_bytes

    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((row.tokens, row.shape.k), generator=generator, device="cuda", dtype=torch.bfloat16)
    x_fp8, x_scale = mxfp4.quantize_activations(x)
    offsets = torch.tensor(offsets_from_loads(row.loads), dtype=torch.int32, device="cuda")
    budget = min(4 << 30, int(torch.cuda.mem_get_info()[0] * 0.15))
    return fp8_paths.Operands(weights, x, x_fp8, x_scale, offsets, row.nbytes, l2_cache_bytes(), budget)


def run_row(row: Row, weights: fp8_paths.Weights, settings: Settings, save: Callable) -> None:
    run_paths(row, operands(row, weights, settings.seed + row.m), settings, save)


def run_paths(row: Row, ops: fp8_paths.Operands, settings: Settings, save: Callable) -> None:
    """Every path of one row on its operands (x quantized once, outside any timed call): checked, then timed."""
    samples = sample_rows(row.loads, seed=settings.seed)
    index, ref_bf16 = measure.reference_rows(ops.x, ops.weights.dequantized, samples)
    x_rounded = ops.x_fp8.float() * ops.x_scale.unsqueeze(1)  # the e4m3 x the W4A8 paths multiply
    _, ref_fp8 = measure.reference_rows(x_rounded, ops.weights.dequantized, samples)
    for path in PATHS:
        ref = ref_fp8 if REFERENCE[path] == "fp8" else ref_bf16
        tolerance = TOLERANCE.get(path, TOLERANCE[REFERENCE[path]])
        with measure.Watchdog(settings.watchdog, save):
            row.results[path] = run_path(path, ops, index, ref, settings, fp8_paths.PREPARE[path], tolerance)


# ---------------------------------------------------------------------------------------------
# accuracy


def activations(kind: str, tokens: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian x, or heavy-tailed: one channel in HEAVY_CHANNELS HEAVY_FACTOR times larger (LLM outliers)."""
    x = torch.randn((tokens, k), generator=generator, device="cuda")
    if kind == "heavy-tailed":
        channels = torch.randperm(k, generator=generator, device="cuda")[: max(1, k // HEAVY_CHANNELS)]
        x[:, channels] *= HEAVY_FACTOR
    return x.bfloat16()


def accuracy_rows(model: str, projection: str, weights: fp8_paths.Weights, seed: int, m: int = 64) -> list[dict]:
    """Per kind of x: W4A8 against W4A16 (the bf16-activation result), and both against float64 (bf16 x)."""
    import mxfp4

    e, n, k = weights.plain.shape
    loads = [m] * e
    offsets = torch.tensor(offsets_from_loads(loads), dtype=torch.int32, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for kind in ("gaussian", "heavy-tailed"):
        x = activations(kind, e * m, k, generator)
        bf16 = mxfp4.grouped_mm(x, weights.plain, offsets)
        x_fp8, x_scale = mxfp4.quantize_activations(x)
        fp8 = mxfp4.grouped_mm(x_fp8, weights.ready, offsets, x_scale=x_scale)
        index, ref = measure.reference_rows(x, weights.dequantized, sample_rows(loads, seed=seed))
        ready = weights.ready
        rows.append({"model": model, "projection": projection, "E": e, "N": n, "K": k, "x": kind, "m": m,
                     "fp8_vs_bf16": measure.rel_error(fp8, bf16), "fp8_vs_float64": measure.rel_error(fp8[index], ref),
                     "bf16_vs_float64": measure.rel_error(bf16[index], ref),
                     "rerounded_blocks": ready.rerounded_blocks, "total_blocks": ready.total_blocks})
        del x, bf16, x_fp8, fp8
    return rows


def format_accuracy(rows: list[dict]) -> str:
    header = ("shape", "x", "W4A8 vs W4A16", "W4A8 vs float64", "W4A16 vs float64", "re-rounded blocks")
    lines = [(f"{r['model']} {r['projection']}", r["x"], f"{r['fp8_vs_bf16']:.2e}", f"{r['fp8_vs_float64']:.2e}",
              f"{r['bf16_vs_float64']:.2e}",
              f"{r['rerounded_blocks']} / {r['total_blocks']} ({100 * r['rerounded_blocks'] / max(1, r['total_blocks']):.4f}%)")
             for r in rows]
    return align(header, lines, {0, 1})


# ---------------------------------------------------------------------------------------------
# derived columns and the table


def annotate(rows: list[Row], read_bw: float, fp8_peak: float) -> None:
    """TFLOP/s, the FP8-peak fraction (as ``peak_fraction``), the memory-floor fraction, and x W4A16 per path."""
    for row in rows:
        base = row.results.get("W4A16", {}).get("graph_us")
        for result in row.results.values():
            result.update(derived(result, row.nbytes, row.flops, read_bw, fp8_peak))
            if base and result.get("graph_us"):
                result["vs_w4a16"] = base / result["graph_us"]
        ours, torch_fp8 = row.results.get("W4A8", {}), row.results.get("torch fp8", {})
        if ours.get("graph_us") and torch_fp8.get("graph_us"):
            ours["vs_torch_fp8"] = torch_fp8["graph_us"] / ours["graph_us"]


def _cell(value: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def format_rows(rows: list[Row]) -> str:
    header = ("shape", "routing", "M", "path", "rel err", "graph us", "TFLOP/s", "%FP8 peak", "%floor", "x W4A16",
              "x torch fp8")
    lines = []
    for row in rows:
        routing = row.routing if row.routing == "uniform" else f"zipf (max {max(row.loads)})"
        for path in PATHS:
            r = row.results.get(path, {})
            if "error" in r:
                lines.append((f"{row.model} {row.projection}", routing, str(row.m), path, str(r["error"])[:70], *["-"] * 6))
                continue
            lines.append((f"{row.model} {row.projection}", routing, str(row.m), path, _cell(r.get("rel_error"), ".1e"),
                          _cell(r.get("graph_us"), ".1f"), _cell(r.get("tflops"), ".0f"),
                          _cell(r.get("peak_fraction"), ".0f", 100), _cell(r.get("floor_fraction"), ".0f", 100),
                          _cell(r.get("vs_w4a16"), ".2f"), _cell(r.get("vs_torch_fp8"), ".2f")))
    return align(header, lines, {0, 1, 3})


# ---------------------------------------------------------------------------------------------
# the suite


def _settings(args: argparse.Namespace) -> Settings:
    from . import peers

    settings = Settings(quick=args.quick, graph=not args.no_graph, watchdog=args.watchdog, seed=args.seed)
    reason = "skipped (--no-humming)" if args.no_humming else peers.humming_unavailable()
    if reason:
        settings.skip["humming fp8"] = reason if args.no_humming else f"humming fp8 unavailable: {reason}"
    return settings


def _run_shapes(models: list[str], m_values: list[int], routings: list[str], settings: Settings, rows: list[Row],
                accuracy: list[dict], skipped: list[str], save: Callable) -> bool:
    """Every (model, projection): the accuracy rows and the timed rows; True when the CUDA context was lost."""
    for model in models:
        for projection, shape in MODEL_SHAPES[model].items():
            print(f"bench fp8: {model} {projection} ({shape.label}): building weights", file=sys.stderr)
            weights = build_weights(shape, settings)
            accuracy.extend(accuracy_rows(model, projection, weights, settings.seed))
            shape_rows = rows_for_shape(model, projection, shape, m_values, routings, settings, skipped)
            rows.extend(shape_rows)
            try:
                for row in shape_rows:
                    print(f"bench fp8: {model} {projection} M={row.m} {row.routing}", file=sys.stderr)
                    run_row(row, weights, settings, save)
            except RuntimeError as error:
                print(f"bench fp8: {error}; stopping", file=sys.stderr)
                return True
            del weights
            torch.cuda.empty_cache()
    return False


def run(args: argparse.Namespace, m_values: list[int]) -> int:
    """The suite for parsed arguments (``benchmarks.cli`` checked them); 1 if the CUDA context was lost."""
    from codegen.tune.timing import measure_fp8_peak

    settings = _settings(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine, fp8_peak = Machine.measure(), measure_fp8_peak()
    line = f"{machine.line()}; FP8 e4m3 peak {fp8_peak.value / 1e12:.0f} TFLOP/s (torch._scaled_mm 8192^3, this run)"
    print(f"bench fp8: {line}", file=sys.stderr)
    models = args.model or (["gpt-oss-20b"] if args.quick else sorted(MODEL_SHAPES))
    routing_kinds = routings(args.routing)
    started, rows, accuracy, skipped = time.time(), [], [], []

    def save(partial: bool = False) -> Path:
        payload = {**machine.as_dict(), "fp8_peak": fp8_peak.as_dict(), "suite": "fp8", "m_values": m_values,
                   "skipped": skipped, "partial": partial, "seconds": round(time.time() - started, 1),
                   "accuracy": accuracy, "rows": [row.as_dict() for row in rows]}
        return write_json(out_dir / "bench_fp8.json", payload)

    lost = _run_shapes(models, m_values, routing_kinds, settings, rows, accuracy, skipped, save)
    annotate(rows, machine.read.value, fp8_peak.value)
    print(f"bench fp8: wrote {save(partial=lost)}", file=sys.stderr)
    print(f"device: {line}; {time.time() - started:.0f} s")
    for note in skipped + [v for k, v in settings.skip.items()]:
        print(f"skipped: {note}")
    print("times in us (graph = CUDA-graph replay per call); TFLOP/s and %FP8 peak on the graph time; %floor = (bytes "
          "of the bf16-x problem / torch.sum read BW) / graph time; x W4A16 = our W4A16 time / the path's; x torch fp8 "
          "= torch._scaled_grouped_mm's time / our W4A8's")
    print(format_rows(rows))
    print("\naccuracy (relative error, ||a - b|| / ||b||; M = 64 tokens per expert)")
    print(format_accuracy(accuracy))
    return 1 if lost else 0
