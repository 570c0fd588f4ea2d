"""``hopper-mxfp4 bench [SUITE] [options]``: one parser for every suite, checked before any GPU work.

Suites: ``grouped`` (default; ours vs humming vs bf16 ``torch._grouped_mm``), ``host`` (host µs per
eager call), ``host-cpu`` (the host work of an ``mxfp4.moe`` call on the CPU, device stubbed), ``fallback``
(the portable path forced on this GPU vs bf16), ``moe`` (the gpt-oss expert layer), ``fp8`` (W4A8 vs W4A16,
torch's FP8 grouped GEMM, bf16 and humming's FP8 input path, and the accuracy table), ``ncu-case`` (the
M = 1 gate_up calls under NVTX ranges, for Nsight Compute) and
``e2e`` (gpt-oss as a model: checkpoint, load, decode).
Every flag is accepted by every suite; the help says which suites read it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from .problems import (
    FALLBACK_M_VALUES,
    FP8_M_VALUES,
    FP8_QUICK_M_VALUES,
    HOST_MOE_TOKENS,
    M_VALUES,
    MODEL_SHAPES,
    MOE_TOKENS,
    QUICK_M_VALUES,
    QUICK_MOE_TOKENS,
    parse_int_list,
)

TIMELINE_TOKENS = (1, 2, 8)  # the batch-1 user's layer calls (issue 21)

SUITES = ("grouped", "host", "host-cpu", "fallback", "moe", "timeline", "fp8", "ncu-case", "waits", "e2e")
PROG = "hopper-mxfp4 bench"

DESCRIPTION = (
    "Side-by-side benchmarks of the MXFP4 grouped GEMM on the gpt-oss MoE shapes, uniform and Zipf routing. "
    "Every output is checked against a float64 reference before it is timed; times are CUDA-graph replay, "
    "eager back-to-back and device (kernel) µs; floors from torch.sum read bandwidth and the bf16 peak measured "
    "in the same run. Writes JSON (+ PNG with matplotlib) to --out and prints the table last."
)
EPILOG = """suites:
  grouped    ours (mxfp4.grouped_mm) vs humming-kernels 0.1.19 vs bf16 torch._grouped_mm (default)
  host       host µs per eager call: grouped_mm, grouped_mm_masked, torch._grouped_mm, humming, and mxfp4.moe at
             T = 1, 8, 64 (graph replay on and off) against its target (<= 60 us); --moe-only: just those
  host-cpu   the host work of one mxfp4.moe call (gpt-oss-20b, T = 1, 8, 64) on this CPU with the device
             stubbed: us per call, torch ops, allocations, launches (no GPU needed)
  fallback   the portable path forced on this GPU (HOPPER_MXFP4_FORCE_PORTABLE=1): the in-register kernel (no copy),
             the cached bf16 copy, bf16 torch._grouped_mm and our SM90 kernel
  moe        a gpt-oss expert layer (gpt-oss-20b, or one --model): mxfp4.moe (bf16 and FP8 activations), the
             unfused mxfp4 glue, the bf16 torch layer, transformers
  timeline   where mxfp4.moe's time goes at small T (default 1, 2, 8): each kernel's GPU time and the gap before it
             in a CUDA-graph replay, from the CUDA profiler's trace, bf16 and FP8 layers (one --model)
  fp8        FP8 activations: our W4A8 vs our W4A16, torch._scaled_grouped_mm (FP8 weights), bf16 torch._grouped_mm
             and humming's FP8 input path, TFLOP/s and percent of the FP8 peak; then the accuracy table
  waits      which side of the pipeline waits: the wait-probe build of the op's config per projection and M, and
             the shipped build against its copy roof (the same loads, consumers that neither decode nor multiply)
  ncu-case   one call of ours and of humming per projection and M (default gate_up, M=1) in NVTX ranges
             "ours/" and "humming/" (run under ncu)
  e2e        gpt-oss as a model: a synthetic MXFP4 checkpoint at the real dimensions, load_gpt_oss (time,
             peak GPU memory), decode tokens/s eager and compiled, beside transformers' bf16 experts; --layers N|fit
             runs the first N layers, with per-layer figures and the whole model extrapolated (said as such)

examples:
  hopper-mxfp4 bench --quick
  hopper-mxfp4 bench --model gpt-oss-120b --m 1,16,256 --out /tmp/bench
  hopper-mxfp4 bench moe --tokens 1,32,4096 --routing zipf
  hopper-mxfp4 bench fp8 --model gpt-oss-20b --routing uniform
  HOPPER_MXFP4_FORCE_PORTABLE=1 hopper-mxfp4 bench fallback
  hopper-mxfp4 bench e2e --model gpt-oss-120b --dir /dev/shm/e2e --spill-dir /tmp/e2e --layers fit --batch 1,64
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", choices=SUITES, default="grouped", help="what to run (default grouped)")
    parser.add_argument("--quick", action="store_true",
                        help=f"gpt-oss-20b only, M in {','.join(map(str, QUICK_M_VALUES))} (moe: T in "
                        f"{','.join(map(str, QUICK_MOE_TOKENS))}), shorter timings")
    parser.add_argument("--out", metavar="DIR", default="bench-results", help="where the JSON and PNG go (default ./bench-results)")
    parser.add_argument("--model", action="append", choices=sorted(MODEL_SHAPES), default=[],
                        help="models, repeatable (default both; --quick, host, fallback, moe, timeline, e2e: gpt-oss-20b)")
    parser.add_argument("--m", metavar="M,...", help=f"tokens per expert (grouped default {','.join(map(str, M_VALUES))}; "
                        f"fallback {','.join(map(str, FALLBACK_M_VALUES))}; fp8 {','.join(map(str, FP8_M_VALUES))}; host 1,16)")
    parser.add_argument("--tokens", metavar="T,...", help=f"moe: tokens per layer call (default {','.join(map(str, MOE_TOKENS))}; "
                        f"host, host-cpu: {','.join(map(str, HOST_MOE_TOKENS))}; "
                        f"timeline: {','.join(map(str, TIMELINE_TOKENS))})")
    parser.add_argument("--moe-only", action="store_true", help="host: only the mxfp4.moe rows")
    parser.add_argument("--routing", choices=("uniform", "zipf", "both"),
                        help="routings (default both; ncu-case, timeline: uniform)")
    parser.add_argument("--projections", default="gate_up", metavar="P,...",
                        help="ncu-case, waits: the projections, gate_up and/or down (default gate_up)")
    parser.add_argument("--baseline-templates", metavar="DIR", action="append", default=[],
                        help="waits: also time the kernels built from DIR's device headers (an earlier version; "
                        "repeatable)")
    parser.add_argument("--prefill", action="store_true",
                        help="ncu-case: profile the prefill paths (W4A16, W4A8, torch FP8, torch bf16, humming FP8) "
                             "in one NVTX range 'prefill', in that order")
    parser.add_argument("--configs", metavar="NAME,...", default="",
                        help="ncu-case --prefill: instead of the five paths, ours with each of these tile configs "
                             "forced (W4A16 for a bf16 config, W4A8 for an _fp8 one), in this order")
    parser.add_argument("--mma-roof", action="store_true",
                        help="ncu-case --prefill --configs: after each config, its roof builds (no decode, no "
                             "epilogue, neither: what the pipeline and the tensor cores cost without them; output "
                             "not the product)")
    parser.add_argument("--roofs", metavar="FLAG,...", default="",
                        help="ncu-case --mma-roof: only the roof builds whose every launch.load flag is listed "
                             "(no_decode, no_epilogue, coalesced_stores, paired_stores, swiglu_lines)")
    parser.add_argument("--no-humming", action="store_true", help="leave humming out (grouped, host, fp8, ncu-case)")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay times")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write no PNG")
    parser.add_argument("--calls", type=int, default=300, metavar="N", help="host: calls enqueued per host-time measurement (default 300)")
    parser.add_argument("--watchdog", type=float, default=300.0, metavar="S",
                        help="seconds one measurement may take before the run saves and exits (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random data and routing seed")
    from .e2e_options import add_arguments as add_e2e_arguments

    add_e2e_arguments(parser)
    parser.add_argument("--portable-sweep", action="store_true",
                        help="fallback: also time every candidate tile config of the portable kernel per row")
    parser.add_argument("--model-path", metavar="DIR",
                        help="fallback: load gpt-oss from DIR with load_gpt_oss on the forced portable path and "
                        "report its GPU memory and a short decode, instead of the table")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` verb to ``python -m codegen`` / ``hopper-mxfp4``; its handler is :func:`run`."""
    parser = subparsers.add_parser("bench", help="side-by-side benchmarks: ours vs humming vs bf16 torch, host, "
                                   "fallback, MoE layer", description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def m_values_for(args: argparse.Namespace) -> list[int]:
    """The M (or, for moe, T) values a command line asks for; ValueError naming the flag."""
    if args.suite == "moe":
        return parse_int_list(args.tokens, QUICK_MOE_TOKENS if args.quick else MOE_TOKENS, name="--tokens")
    if args.suite == "timeline":
        return parse_int_list(args.tokens, TIMELINE_TOKENS, name="--tokens")
    if args.suite == "host-cpu":
        return parse_int_list(args.tokens, HOST_MOE_TOKENS, name="--tokens")
    if args.suite == "e2e":
        from .e2e_options import DEFAULT_BATCHES

        return parse_int_list(args.batch, DEFAULT_BATCHES, name="--batch")
    defaults = {"fallback": FALLBACK_M_VALUES, "host": (1, 16), "ncu-case": (1,), "waits": (1, 16),
                "fp8": FP8_QUICK_M_VALUES if args.quick else FP8_M_VALUES}
    default = defaults.get(args.suite, QUICK_M_VALUES if args.quick else M_VALUES)
    return parse_int_list(args.m, default, name="--m")


def _suite(name: str) -> Callable[[argparse.Namespace, list[int]], int]:
    # Imported on demand: each suite pulls in torch/CUDA machinery the parser does not need.
    if name == "grouped":
        from .bench_grouped_mm import run
    elif name == "host":
        from .host import run
    elif name == "host-cpu":
        from .host_cpu import run
    elif name == "fallback":
        from .fallback import run
    elif name == "moe":
        from .bench_moe import run
    elif name == "timeline":
        from .timeline import run
    elif name == "e2e":
        from .e2e import run
    elif name == "fp8":
        from .bench_fp8 import run
    elif name == "waits":
        from .waits import run
    else:
        from .ncu_case import run
    return run


def run(args: argparse.Namespace) -> int:
    """Run the suite; 2 on a bad list of values or without a CUDA GPU."""
    try:
        values = m_values_for(args)
    except ValueError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    if args.calls < 1:
        print(f"bench: error: --calls {args.calls}: give a positive count", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available() and not (args.suite == "e2e" and args.tiny) and args.suite != "host-cpu":
        print("bench needs a CUDA GPU (torch.cuda.is_available() is False; e2e --tiny and host-cpu run on the CPU)",
              file=sys.stderr)
        return 2
    return int(_suite(args.suite)(args, values) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
