"""The Nsight Compute case: one call of ours and of humming per (projection, M), each inside an NVTX range
("ours/", "humming/"), for gpt-oss-20b and -120b (``--model``), gate_up by default (``--projections gate_up,down``
adds down), M = 1 by default (``--m 1,16``), uniform routing by default (``--routing zipf`` or ``both``: the same
total rows with Zipf loads, so Nsight's DRAM bytes say whether the heavy experts' m-tiles re-read their weights).
The profiled kernels come in the order the log prints. Run it under ncu, e.g.

    ncu --clock-control none --nvtx --nvtx-include "ours/" --section SpeedOfLight ... \\
        python3 -m codegen bench ncu-case --model gpt-oss-20b

Each path is called once outside the range first (compile, load, humming's JIT), so the profiled
call is a warm one.

``--prefill`` profiles the prefill paths instead (issue 24): per (projection, M), W4A16, W4A8 on e4m3 x, torch's
FP8 grouped GEMM (``torch._scaled_grouped_mm``, 8-bit weights), torch bf16 ``_grouped_mm`` and humming's FP8 path,
in that order, each call inside one NVTX range named "prefill" (``--nvtx-include "prefill/"``); the log names the
order, which is the report's. ``--prefill --configs A,B`` profiles ours with each tile config forced instead (W4A16
for a bf16 config, W4A8 for an ``_fp8`` one), e.g. a variant beside the config the table picks; ``--mma-roof``
adds after each its roof builds (fp8_paths.ROOF_BUILDS: the same kernel without the decode, without the epilogue,
without both, with whole-line stores in the wrong places, and with the paired stores of before), so the report shows
what the decode and the epilogue each cost the tensor pipes at that config; after a ``_swiglu`` config (the MoE layer's
gate_up epilogue, launched directly, no bias), its candidate stores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import peers
from .bench_grouped_mm import operands
from .problems import MODEL_SHAPES, make_row, routings


def profile_once(name: str, prepared: peers.Prepared) -> None:
    prepared.fn(*prepared.arg_sets[0])  # warm: outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(name)
    prepared.fn(*prepared.arg_sets[0])
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


def run_model(model: str, projection: str, args: argparse.Namespace, m_values: list[int]) -> None:
    from codegen.tune.sweep import random_weights

    shape = MODEL_SHAPES[model][projection]
    packed, dequantized = random_weights(shape, torch.device("cuda"), seed=args.seed)
    paths: dict[str, Any] = {"ours": peers.prepare_ours, "humming": peers.prepare_humming}
    for m in m_values:
        for routing in routings(args.routing, default="uniform"):
            row = make_row(model, projection, shape, routing, m, seed=args.seed)
            ops = operands(row, packed, dequantized, seed=args.seed)
            ops.budget = 0
            active = sum(1 for load in row.loads if load)
            case = (f"{model} {projection} M={m} {routing} ({active} experts active, at most {max(row.loads)} rows, "
                    f"{row.nbytes / 1e6:.1f} MB to read)")
            for name, prepare in paths.items():
                if name == "humming" and args.no_humming:
                    continue
                try:
                    profile_once(name, prepare(ops))
                    print(f"ncu-case: {case}: profiled {name} (weights {shape.num_experts * shape.n * shape.k})")
                except Exception as error:
                    print(f"ncu-case: {case}: {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            del ops
    del packed, dequantized
    torch.cuda.empty_cache()


PREFILL_PATHS = ("W4A16", "W4A8", "torch fp8", "torch bf16", "humming fp8")  # the profiled order


def prefill_paths(configs: str, mma_roof: bool = False, roofs: str = "") -> dict[str, Callable[[Any], Any]]:
    """The profiled paths in order: the five of PREFILL_PATHS, or (``--configs``) ours with each config forced,
    each followed by its roof builds (fp8_paths.roof_builds) with ``mma_roof``, only those whose every flag is
    among ``roofs`` (comma-separated launch.load flags, e.g. "no_epilogue,paired_stores") when it is given. A malformed
    config name raises ValueError before any weights are built."""
    from . import fp8_paths

    names = [name for name in configs.split(",") if name]
    paths: dict[str, Callable[[Any], Any]] = {}
    for name in names:
        paths[f"config {name}"] = fp8_paths.prepare_forced(name)
        if mma_roof:
            only = frozenset(flag for flag in roofs.split(",") if flag) or None
            for leaves_out, _ in fp8_paths.roof_builds(name, only):
                paths[f"config {name} roof ({leaves_out})"] = fp8_paths.prepare_roof(name, leaves_out)
    return paths or {path: fp8_paths.PREPARE[path] for path in PREFILL_PATHS}


def run_model_prefill(model: str, projection: str, args: argparse.Namespace, m_values: list[int]) -> None:
    from .bench_fp8 import build_weights, operands
    from .bench_grouped_mm import Settings

    shape = MODEL_SHAPES[model][projection]
    settings = Settings(quick=True, graph=False, seed=args.seed)
    if args.no_humming:
        settings.skip["humming fp8"] = "skipped (--no-humming)"
    weights = build_weights(shape, settings)
    paths = prefill_paths(args.configs, args.mma_roof, args.roofs)
    for m in m_values:
        ops = operands(make_row(model, projection, shape, "uniform", m), weights, args.seed + m)
        for path, prepare in paths.items():
            if path in settings.skip:
                print(f"ncu-case: {model} {projection} M={m}: {path} not profiled: {settings.skip[path]}")
                continue
            try:
                profile_once("prefill", prepare(ops))
                print(f"ncu-case: {model} {projection} M={m}: profiled {path}")
            except Exception as error:
                print(f"ncu-case: {model} {projection} M={m}: {path} failed: {type(error).__name__}: {error}",
                      file=sys.stderr)
        del ops
    del weights
    torch.cuda.empty_cache()


def run(args: argparse.Namespace, m_values: list[int]) -> int:
    projections = [p for p in args.projections.split(",") if p]
    unknown = sorted(set(projections) - {"gate_up", "down"})
    if unknown:
        print(f"bench ncu-case: error: --projections {args.projections!r}: give gate_up and/or down", file=sys.stderr)
        return 2
    if args.configs and not args.prefill:
        print("bench ncu-case: error: --configs forces prefill tile configs: give it with --prefill", file=sys.stderr)
        return 2
    if args.mma_roof and not args.configs:
        print("bench ncu-case: error: --mma-roof profiles the forced configs' MMA-roof builds: give --prefill --configs",
              file=sys.stderr)
        return 2
    if args.roofs and not args.mma_roof:
        print("bench ncu-case: error: --roofs picks among the --mma-roof builds: give --mma-roof", file=sys.stderr)
        return 2
    if args.prefill and args.routing not in (None, "uniform"):
        print("bench ncu-case: error: --prefill profiles uniform routing only; --routing is for the decode cases",
              file=sys.stderr)
        return 2
    try:
        prefill_paths(args.configs, args.mma_roof, args.roofs)
    except ValueError as error:
        print(f"bench ncu-case: error: --configs: {error}", file=sys.stderr)
        return 2
    for model in args.model or sorted(MODEL_SHAPES):
        for projection in projections:
            (run_model_prefill if args.prefill else run_model)(model, projection, args, m_values)
    return 0
