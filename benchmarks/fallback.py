"""The fallback suite: our portable path, forced on this (Hopper) GPU, vs bf16 ``torch._grouped_mm`` on
the pre-dequantized weights, gpt-oss-20b shapes, M in {1, 16, 256, 4096} (issue 9's table).

The portable path is forced with ``mxfp4.dispatch.force_portable(True)`` (as
``HOPPER_MXFP4_FORCE_PORTABLE=1`` would); the suite refuses to time anything if the
op still takes the SM90 path. The first call is untimed (the fallback may cache decoded weights):
eager and device times are of the second call on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import measure, peers
from .bench_grouped_mm import Machine, operands
from .problems import MODEL_SHAPES, TOLERANCE, Row, make_row, sample_rows
from .report import align, write_json



def force_portable() -> str:
    """Make ``mxfp4`` take its portable path on CUDA; returns the path's reason, raises Unavailable."""
    from mxfp4 import dispatch

    dispatch.force_portable(True)  # resets the cached decision
    choice = dispatch.select_path(torch.device("cuda"))
    if choice.path != dispatch.PORTABLE:
        raise peers.Unavailable("dispatch.force_portable(True) did not take effect: "
                                f"the op still takes {choice.path} ({choice.reason})")
    return choice.reason


def time_path(prepared: peers.Prepared, index: torch.Tensor, ref: torch.Tensor, quick: bool) -> dict[str, Any]:
    out = prepared.fn(*prepared.arg_sets[0])  # the first call (decodes / caches), untimed
    rel = measure.rel_error(out[index], ref)
    del out
    if not rel <= TOLERANCE:
        return {"rel_error": rel, "error": f"wrong result: rel. error {rel:.2e}; not timed"}
    result: dict[str, Any] = {"rel_error": rel, "note": prepared.note}
    result.update(measure.time_all(prepared.fn, prepared.arg_sets, graph=False, quick=quick))
    return result


def run_row(row: Row, packed: Any, dequantized: torch.Tensor, args: argparse.Namespace) -> None:
    ops = operands(row, packed, dequantized, seed=args.seed + row.m)
    index, ref = measure.reference_rows(ops.x, dequantized, sample_rows(row.loads, seed=args.seed))
    for path, prepare in (("ours portable", peers.prepare_ours), ("torch bf16", peers.prepare_torch_bf16)):
        try:
            row.results[path] = time_path(prepare(ops), index, ref, args.quick)
        except Exception as error:
            row.results[path] = {"error": measure.error_text(error)}
            if not measure.healthy():
                raise
        torch.cuda.empty_cache()
    ours, bf16 = row.results["ours portable"].get("eager_us"), row.results["torch bf16"].get("eager_us")
    row.results["ours portable"]["throughput_vs_bf16"] = bf16 / ours if ours and bf16 else None


def format_fallback(rows: list[Row]) -> str:
    header = ("shape", "routing", "M", "ours portable eager us", "device us", "bf16 eager us", "device us",
              "ours/bf16 throughput", "rel err")
    lines = []
    for row in rows:
        ours, bf16 = row.results.get("ours portable", {}), row.results.get("torch bf16", {})
        cell = lambda r, k, f=".1f": "-" if r.get(k) is None else format(r[k], f)  # noqa: E731
        lines.append((f"{row.model} {row.projection}", row.routing, str(row.m),
                      cell(ours, "eager_us") if "error" not in ours else str(ours["error"])[:60], cell(ours, "device_us"),
                      cell(bf16, "eager_us") if "error" not in bf16 else str(bf16["error"])[:60], cell(bf16, "device_us"),
                      cell(ours, "throughput_vs_bf16", ".2f"), cell(ours, "rel_error", ".1e")))
    return align(header, lines, {0, 1})


def run(args: argparse.Namespace, m_values: list[int]) -> int:
    from codegen.sweep import random_weights

    try:
        reason = force_portable()
    except peers.Unavailable as error:
        print(f"fallback: cannot force the portable path: {error}")
        return 1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine, started, rows = Machine.measure(), time.time(), []
    routings = ["uniform", "zipf"] if args.routing == "both" else [args.routing]
    for model in args.model or ["gpt-oss-20b"]:
        for projection, shape in MODEL_SHAPES[model].items():
            packed, dequantized = random_weights(shape, torch.device("cuda"), seed=args.seed)
            for m in m_values:
                for routing in routings:
                    row = make_row(model, projection, shape, routing, m, seed=args.seed)
                    print(f"fallback: {model} {projection} M={m} {routing}", file=sys.stderr)
                    run_row(row, packed, dequantized, args)
                    rows.append(row)
            del packed, dequantized
            torch.cuda.empty_cache()
    write_json(out_dir / "bench_fallback.json", {**machine.as_dict(), "suite": "fallback", "forced": reason,
                                                 "seconds": round(time.time() - started, 1),
                                                 "rows": [row.as_dict() for row in rows]})
    print(f"device: {machine.line()}\nforced portable path: {reason}")
    print("eager = back-to-back calls (second call on), device = kernel events; throughput = bf16 eager / ours eager")
    print(format_fallback(rows))
    return 0
