"""The host suite (issue 9): host µs per eager call, with the eager and graph-replay µs beside it.

Method (TOOLCHAIN.md): ``--calls`` calls enqueued while ``torch.cuda._sleep`` keeps the GPU busy;
wall time / calls. Paths: ``mxfp4.grouped_mm``, ``mxfp4.grouped_mm_masked``, ``torch._grouped_mm``,
humming, and the gpt-oss-20b layer ``mxfp4.moe`` at T = 1, 8, 64 (``--tokens``; at most 100 calls in
flight, fewer than the launch queue holds), with its graph replay on (the default) and off, against
issue 15's target: <= 60 µs per eager call; then the same layer with ``activations="fp8"`` (its launch-by-launch
steps, replayed as a captured graph), replay on and off. ``--moe-only`` measures just the layer.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import measure, peers
from .bench_grouped_mm import Machine, operands
from .problems import HOST_MOE_TOKENS, MODEL_SHAPES, make_row, parse_int_list
from .report import align, write_json


def prepare_masked(ops: peers.Operands, m: int) -> peers.Prepared:
    """``grouped_mm_masked`` on x ``[E, M, K]`` with every row live (uniform routing)."""
    import mxfp4

    e = ops.packed.num_experts
    x3 = ops.x.view(e, m, ops.x.shape[1])
    masked_m = torch.full((e,), m, dtype=torch.int32, device=ops.x.device)
    return peers.Prepared(lambda x, w: mxfp4.grouped_mm_masked(x, w, masked_m), [(x3, ops.packed)])


def prepare_moe(tokens: int, weights: Any, layer: Callable[[Any], Callable[..., torch.Tensor]]) -> peers.Prepared:
    """The gpt-oss-20b layer (``layer``: moe_layers.ours_fused or ours_fused_fp8) at T = ``tokens`` (uniform
    routing, int32 ids, fp32 routing weights)."""
    from .bench_moe import routing

    ids, topk_weights = routing("uniform", tokens, 0)
    x = torch.randn((tokens, weights.gate_up_bf16.shape[2]), device="cuda", dtype=torch.bfloat16) * 0.02
    return peers.Prepared(layer(weights), [(x, ids, topk_weights)], f"T={tokens}")


def measure_path(prepared: peers.Prepared, args: argparse.Namespace, calls: int | None = None) -> dict[str, Any]:
    result = dict(measure.host_time(prepared.fn, prepared.arg_sets, calls=calls or args.calls))
    result.update(measure.time_all(prepared.fn, prepared.arg_sets, graph=not args.no_graph, device=False, quick=True))
    return {**result, "note": prepared.note}


def host_row(model: str, projection: str, shape: Any, m: int, packed: Any, dequantized: torch.Tensor,
             layer: Any, args: argparse.Namespace) -> dict[str, Any]:
    row = make_row(model, projection, shape, "uniform", m, seed=args.seed)
    ops = operands(row, packed, dequantized, seed=args.seed)
    ops.budget = 0  # one weight copy: host time does not depend on where the weights sit
    paths = {"ours grouped_mm": lambda: peers.prepare_ours(ops), "ours grouped_mm_masked": lambda: prepare_masked(ops, m),
             "torch._grouped_mm": lambda: peers.prepare_torch_bf16(ops)}
    if not args.no_humming:
        paths["humming"] = lambda: peers.prepare_humming(ops, layer)
    results = {}
    for name, prepare in paths.items():
        try:
            results[name] = measure_path(prepare(), args)
        except Exception as error:
            results[name] = {"error": measure.error_text(error)}
            if not measure.healthy():
                raise
    return {"model": model, "projection": projection, "m": m, "results": results}


MOE_HOST_TARGET_US = 60.0  # issue 15: eager host time of one mxfp4.moe call on the SM90 path
MOE_PATHS = {"mxfp4.moe": True, "mxfp4.moe (graph replay off)": False}  # name -> mxfp4.set_moe_graphs(...)
FP8_MOE_PATHS = {"mxfp4.moe fp8": True, "mxfp4.moe fp8 (graph replay off)": False}  # activations="fp8"


def moe_rows(token_values: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """mxfp4.moe at each T, with and without the layer's graph replay (same bits: checked here)."""
    from .bench_moe import build_weights

    try:
        weights = build_weights(args.seed)
        rows = [{"model": "gpt-oss-20b", "projection": "moe layer", "m": tokens, "results": moe_results(tokens, weights, args)}
                for tokens in token_values]
    except Exception as error:
        rows = [{"model": "gpt-oss-20b", "projection": "moe layer", "m": 0,
                 "results": {"mxfp4.moe": {"error": measure.error_text(error)}}}]
    torch.cuda.empty_cache()
    return rows


def moe_results(tokens: int, weights: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The bf16 layer's rows (mxfp4.moe, against MOE_HOST_TARGET_US) and the FP8 layer's (its launch-by-launch
    steps, replayed as a captured graph), each with replay on and off."""
    from .moe_layers import ours_fused, ours_fused_fp8

    results = _replay_rows(prepare_moe(tokens, weights, ours_fused), MOE_PATHS, tokens, args)
    try:
        results.update(_replay_rows(prepare_moe(tokens, weights, ours_fused_fp8), FP8_MOE_PATHS, tokens, args))
    except Exception as error:
        results["mxfp4.moe fp8"] = {"error": measure.error_text(error)}
        if not measure.healthy():
            raise
    return results


def _replay_rows(prepared: peers.Prepared, paths: dict[str, bool], tokens: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """``prepared`` with replay on, then off (``paths``: name -> mxfp4.set_moe_graphs(...)), the first row's note
    saying whether the two gave the same bits."""
    import mxfp4

    results, outputs, how = {}, {}, ""
    for name, replay in paths.items():
        mxfp4.set_moe_graphs(replay)
        try:
            outputs[name] = [prepared.fn(*prepared.arg_sets[0]) for _ in range(3)][-1]  # the third call replays
            # At most 100 calls: several launches each without replay, and a full launch queue blocks the host.
            results[name] = measure_path(prepared, args, min(args.calls, 100))
            how = how or portable_replay_note()  # before replay off drops the graphs
        finally:
            mxfp4.set_moe_graphs(None)
    first, second = outputs.values()
    replayed = next(iter(paths))
    results[replayed]["note"] = f"T={tokens}, " + ("same bits as without replay" if torch.equal(first, second)
                                                   else "DIFFERENT bits from the launches") + how
    return results


def portable_replay_note() -> str:
    """How the captured layer's replayed calls copied (after its rows ran; empty for the planned bf16 layer on the
    SM90 path): by moving the graph's copy nodes, or with torch and why."""
    from mxfp4.experts import portable_graphs

    held = portable_graphs.stats()
    if not held["graphs"]:
        return ""
    if held["direct"] == held["graphs"]:
        return ", portable: copy nodes moved"
    return f", portable: torch copies ({portable_graphs.copies_refused()})"


def moe_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per T: mxfp4.moe's host µs against its target."""
    lines = []
    for row in rows:
        r = row["results"].get("mxfp4.moe", {}) if row["projection"] == "moe layer" else None
        if r is None:
            continue
        if r.get("host_us") is None:
            lines.append(f"mxfp4.moe T={row['m']}: not measured ({r.get('error', 'no result')})")
            continue
        met = "met" if r["host_us"] <= MOE_HOST_TARGET_US else "MISSED"
        idle = " (GPU went idle: rerun with fewer --calls)" if r.get("gpu_idle") else ""
        lines.append(f"mxfp4.moe T={row['m']}: eager host {r['host_us']:.1f} us per call "
                     f"(target <= {MOE_HOST_TARGET_US:.0f} us) {met}{idle}")
    return lines


def format_host(rows: list[dict[str, Any]]) -> str:
    header = ("shape", "M", "path", "host us", "eager us", "graph us", "note")
    lines = []
    for row in rows:
        for name, r in row["results"].items():
            cell = lambda k: "-" if r.get(k) is None else f"{r[k]:.1f}"  # noqa: E731
            note = r.get("error") or ("GPU went idle: rerun with fewer --calls" if r.get("gpu_idle") else r.get("note", ""))
            lines.append((f"{row['model']} {row['projection']}", str(row["m"]), name, cell("host_us"),
                          cell("eager_us"), cell("graph_us"), str(note)[:70]))
    return align(header, lines, {0, 2, 6})


def run(args: argparse.Namespace, m_values: list[int]) -> int:
    from codegen.tune.sweep import random_weights

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine, started, rows = Machine.measure(), time.time(), []
    unavailable = None if args.no_humming else peers.humming_unavailable()
    args.no_humming = args.no_humming or unavailable is not None
    for model in [] if args.moe_only else args.model or ["gpt-oss-20b"]:
        for projection, shape in MODEL_SHAPES[model].items():
            packed, dequantized = random_weights(shape, torch.device("cuda"), seed=args.seed)
            layer = None if args.no_humming else peers.humming_layer(packed)
            for m in m_values:
                print(f"host: {model} {projection} M={m}", file=sys.stderr)
                rows.append(host_row(model, projection, shape, m, packed, dequantized, layer, args))
            del packed, dequantized, layer
            torch.cuda.empty_cache()
    rows.extend(moe_rows(parse_int_list(args.tokens, HOST_MOE_TOKENS, name="--tokens"), args))
    write_json(out_dir / "bench_host.json", {**machine.as_dict(), "suite": "host", "calls": args.calls,
                                             "seconds": round(time.time() - started, 1), "rows": rows})
    print(f"device: {machine.line()}")
    if unavailable:
        print(f"humming unavailable: {unavailable}")
    print(f"host us = wall time of {args.calls} enqueued calls / calls, GPU kept busy by torch.cuda._sleep")
    print(format_host(rows))
    print("\ntarget (issue 15):\n  " + "\n  ".join(moe_verdicts(rows)))
    return 0
