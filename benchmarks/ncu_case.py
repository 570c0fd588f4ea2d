"""The Nsight Compute case: one M = 1 gate_up call of ours and of humming, each inside an NVTX
range ("ours/", "humming/"), for gpt-oss-20b and -120b (``--model``). Run it under ncu, e.g.

    ncu --clock-control none --nvtx --nvtx-include "ours/" --section SpeedOfLight ... \\
        python3 -m codegen bench ncu-case --model gpt-oss-20b

Each path is called once outside the range first (compile, load, humming's JIT), so the profiled
call is a warm one.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from . import peers
from .bench_grouped_mm import operands
from .problems import MODEL_SHAPES, make_row


def profile_once(name: str, prepared: peers.Prepared) -> None:
    prepared.fn(*prepared.arg_sets[0])  # warm: outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(name)
    prepared.fn(*prepared.arg_sets[0])
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


def run_model(model: str, args: argparse.Namespace, m: int) -> None:
    from codegen.tune.sweep import random_weights

    shape = MODEL_SHAPES[model]["gate_up"]
    packed, dequantized = random_weights(shape, torch.device("cuda"), seed=args.seed)
    ops = operands(make_row(model, "gate_up", shape, "uniform", m), packed, dequantized, seed=args.seed)
    ops.budget = 0
    paths: dict[str, Any] = {"ours": peers.prepare_ours, "humming": peers.prepare_humming}
    for name, prepare in paths.items():
        if name == "humming" and args.no_humming:
            continue
        try:
            profile_once(name, prepare(ops))
            print(f"ncu-case: {model} gate_up M={m}: profiled {name}")
        except Exception as error:
            print(f"ncu-case: {model} gate_up M={m}: {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
    del packed, dequantized, ops
    torch.cuda.empty_cache()


def run(args: argparse.Namespace, m_values: list[int]) -> int:
    for model in args.model or sorted(MODEL_SHAPES):
        run_model(model, args, m_values[0])
    return 0
