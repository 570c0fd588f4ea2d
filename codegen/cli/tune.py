"""``python -m codegen tune``: the autotuning sweep from the command line.

``register(subparsers)`` adds the ``tune`` verb to a parser (``codegen.cli.main`` wires it);
``run(args)`` does it. ``python -m codegen.cli.tune ...`` runs the same verb on its own.

The sweep runs in a worker process that this one supervises: a kernel that faults leaves the CUDA
context unusable and a kernel that hangs cannot be interrupted, so the worker records the culprit
in the progress log and exits with ``EXIT_RESTART``; the supervisor then starts a fresh worker,
which resumes after it (at most ``--max-restarts`` times).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from codegen.build.config import TileConfig

from .common import UsageError, add_verb, parse_each, positive_int

EXAMPLES = """\
examples:
  python -m codegen tune --model gpt-oss-20b --quick
  python -m codegen tune --model gpt-oss-120b --m 1,16,256
  python -m codegen tune --shape 32,5760,2880 --shape 32,2880,2880 --m 1,4,16,64
  python -m codegen tune --shape 8,1024,1024 --m 16 --configs n128_m16_k256_s7_wg2,n128_m32_k256_s5_wg2
  python -m codegen tune --model gpt-oss-20b --out generated/tuning/h100.json   # refresh the shipped table
  python -m codegen tune --model gpt-oss-20b --activations fp8 --quick          # the W4A8 family
  python -m codegen tune --model gpt-oss-20b --quick --m 16,64,256 --routing both  # robust to skewed routing

The table goes to the user tuning dir ($HOPPER_MXFP4_TUNING_DIR, else ~/.cache/hopper-mxfp4/tuning)
as <gpu>.json, which mxfp4.grouped_mm consults before the shipped generated/tuning/ tables. Results
are logged to <out>.progress.jsonl as they come: an interrupted sweep resumes where it stopped.
"""


ROUTING_CHOICES = ("uniform", "zipf", "both")


def routings_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The routings ``--routing`` names: ("uniform",), ("zipf",) or ("uniform", "zipf")."""
    from codegen.tune.loads import ROUTINGS

    routing = getattr(args, "routing", "uniform")
    return tuple(ROUTINGS) if routing == "both" else (routing,)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from codegen.tune.tables import DEFAULT_M_VALUES, MODEL_SHAPES

    what = parser.add_argument_group("what to tune")
    what.add_argument("--model", action="append", choices=sorted(MODEL_SHAPES), default=[],
                      help="the MoE shapes of a model (gate_up and down projections); repeatable")
    what.add_argument("--shape", action="append", default=[], metavar="E,N,K",
                      help="a grouped GEMM shape: experts, weight rows, K; repeatable")
    what.add_argument("--m", type=_int_list, default=list(DEFAULT_M_VALUES), metavar="M,...",
                      help="tokens per expert to measure (on average: E x M rows in all); each lands in the "
                      f"power-of-two bucket at or above it (default: {','.join(map(str, DEFAULT_M_VALUES))})")
    what.add_argument("--routing", choices=ROUTING_CHOICES, default="uniform",
                      help="how the E x M rows are spread over the experts: uniform (M each, default), zipf (the "
                      "benchmarks' skewed top-4 split, loads 1/rank^1.1) or both: every candidate is measured "
                      "under both and the entry takes the config whose worse ratio to the best time under "
                      "either routing is smallest (codegen.tune.choice); both also widens the tile_m window")
    space = parser.add_argument_group("configs")
    chosen = space.add_mutually_exclusive_group()
    chosen.add_argument("--configs", metavar="NAME,...", help="exactly these configs (e.g. n128_m64_k128_s7_wg2,...)")
    chosen.add_argument("--quick", action="store_true", help="a small search space (about 130 configs)")
    chosen.add_argument("--full", action="store_true", help="every valid config, no pruning (about 6400)")
    space.add_argument("--activations", choices=("bf16", "fp8"), default="bf16",
                       help="the kernel family to sweep: bf16 (W4A16, default) or fp8 (W4A8: e4m3 activations, the "
                       "FP8-ready weight layout); its entries go under E,N,K:fp8 in the table")
    space.add_argument("--narrow-wgmmas", action="store_true",
                       help="also try each config with WGMMAs half and a quarter as wide where a tile's rows are few "
                       "(TileConfig.mma_rows, names _r<n>; two CTAs per SM too): taller tiles for skewed routing's "
                       "heavy experts")
    space.add_argument("--no-m-window", action="store_true",
                       help="measure every candidate at every M (default: only tile_m near M, see codegen.tune.space.tile_m_window)")
    run = parser.add_argument_group("running")
    run.add_argument("--jobs", "-j", type=positive_int, default=None, metavar="N", help="parallel compiles (default: CPUs)")
    run.add_argument("--out", metavar="PATH", help="the table to write (default: <user tuning dir>/<gpu>.json)")
    run.add_argument("--no-resume", action="store_true", help="ignore the progress log of an earlier run; measure everything")
    run.add_argument("--rep", type=int, default=50, metavar="N", help="timed calls per measurement (default 50)")
    run.add_argument("--watchdog", type=float, default=180.0, metavar="S",
                     help="seconds one measurement may take before it counts as hung (default 180)")
    run.add_argument("--max-restarts", type=int, default=20, metavar="N",
                     help="fresh workers to start after faulting/hanging kernels (default 20)")
    run.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--worker-m-window", action="store_true", help=argparse.SUPPRESS)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``tune`` verb to ``subparsers`` (from ``parser.add_subparsers()``); its handler is ``run``."""
    parser = add_verb(
        subparsers, "tune", run,
        help="autotune the tile config per shape and tokens per expert (needs an SM90 GPU)",
        description="Compile candidate tile configs in parallel, check each against an fp32 reference, time it "
        "on the GPU with device events (median of rotating inputs larger than the L2), and write a tuning table "
        "of the fastest correct config per (E, N, K, M bucket), with the heuristic default's time for comparison "
        "(--routing both: the config most robust to uniform and Zipf loads of the same rows). "
        "Prints a summary table and draws a PNG (with matplotlib).",
        epilog=EXAMPLES,
    )
    add_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------


def resolve(args: argparse.Namespace):
    """(shapes, m values, configs, m_filter) from the arguments; raises UsageError."""
    from codegen.tune.space import SearchSpace, enumerate_configs, m_filter_for, with_narrow_wgmmas
    from codegen.tune.tables import MODEL_SHAPES, Shape

    shapes: list[Shape] = []
    for model in args.model:
        shapes += MODEL_SHAPES[model].values()
    shapes += parse_each(args.shape, Shape.parse, "--shape")
    if not shapes:
        raise UsageError("name what to tune: --model gpt-oss-20b|gpt-oss-120b and/or --shape E,N,K")
    shapes = list(dict.fromkeys(shapes))
    if args.configs:
        configs = parse_each(filter(None, (n.strip() for n in args.configs.split(","))), TileConfig.from_name, "--configs")
        if not configs:
            raise UsageError("--configs: no config names given")
        m_filter = None
    else:
        space = SearchSpace.quick() if args.quick else SearchSpace.full() if args.full else SearchSpace()
        if args.narrow_wgmmas:
            space = with_narrow_wgmmas(space)
        configs = enumerate_configs(dataclasses.replace(space, activations=args.activations))
        m_filter = None if args.no_m_window else m_filter_for(routings_of(args))
    if args.no_m_window:
        m_filter = None
    if len({c.activations for c in configs}) > 1:
        raise UsageError("--configs: name configs of one kernel family (all _fp8, or none), one sweep per family")
    return shapes, sorted(set(args.m)), configs, m_filter


def _gpu_problem() -> str | None:
    """None on an SM90 GPU, else what was found instead."""
    try:
        import torch
    except ImportError as error:
        return f"torch cannot be imported ({error})"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if tuple(capability) != (9, 0):
        return f"{torch.cuda.get_device_name()} (compute capability {capability[0]}.{capability[1]})"
    return None


def _worker_argv(args: argparse.Namespace, shapes, m_values, configs, resume: bool, out: Path) -> list[str]:
    argv = [f"--shape={s.key}" for s in shapes]
    argv.append("--m=" + ",".join(map(str, m_values)))
    argv.append("--configs=" + ",".join(c.name for c in configs))
    if args.configs is None and not args.no_m_window:
        argv.append("--worker-m-window")
    argv += [f"--out={out}", f"--rep={args.rep}", f"--watchdog={args.watchdog}", f"--routing={args.routing}", "--worker"]
    if args.jobs is not None:
        argv.append(f"--jobs={args.jobs}")
    if not resume:
        argv.append("--no-resume")
    if args.no_plot:
        argv.append("--no-plot")
    if args.quiet:
        argv.append("--quiet")
    return argv


def run(args: argparse.Namespace) -> int:
    from codegen.tune.sweep import EXIT_RESTART
    from codegen.tune.tables import default_table_path

    try:
        shapes, m_values, configs, m_filter = resolve(args)
    except UsageError as error:
        print(f"tune: error: {error}", file=sys.stderr)
        return 2
    problem = _gpu_problem()
    if problem is not None:
        print(f"tune needs an SM90 GPU; found {problem}", file=sys.stderr)
        return 2
    import torch

    out = Path(args.out) if args.out else default_table_path(torch.cuda.get_device_name())
    if getattr(args, "worker", False):
        return _work(args, shapes, m_values, configs, m_filter, out)

    # Supervise workers: each resumes from the progress log the one before it wrote.
    resume = not args.no_resume
    for attempt in range(args.max_restarts + 1):
        command = [sys.executable, "-m", "codegen.cli.tune", *_worker_argv(args, shapes, m_values, configs, resume, out)]
        environment = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = root + (os.pathsep + environment["PYTHONPATH"] if environment.get("PYTHONPATH") else "")
        code = subprocess.call(command, env=environment)
        if code != EXIT_RESTART:
            return code
        resume = True
        print(f"tune: worker stopped to restart ({attempt + 1} of at most {args.max_restarts}); resuming in a fresh process",
              file=sys.stderr)
    print(f"tune: gave up after {args.max_restarts} restarts; the progress log has what was measured", file=sys.stderr)
    return 1


def _work(args, shapes, m_values, configs, m_filter, out: Path) -> int:
    from codegen.tune.sweep import EXIT_RESTART, GpuContextLost, GpuMeasurer, run_sweep

    if getattr(args, "worker_m_window", False):
        from codegen.tune.space import m_filter_for

        m_filter = m_filter_for(routings_of(args))
    try:
        measure = GpuMeasurer(rep=args.rep)
    except RuntimeError as error:
        print(f"tune: {error}", file=sys.stderr)
        return 2
    try:
        table = run_sweep(
            shapes, m_values, configs, out_path=out, jobs=args.jobs, resume=not args.no_resume,
            progress=not args.quiet, measure=measure, m_filter=m_filter, routings=routings_of(args),
            device_name=measure.device_name,
            watchdog_s=args.watchdog if args.watchdog and args.watchdog > 0 else None, plot=not args.no_plot,
        )
    except GpuContextLost as error:
        print(f"tune: {error}", file=sys.stderr)
        return EXIT_RESTART
    from codegen.tune.tables import table_key

    wanted = {table_key(s, configs[0].activations) for s in shapes}
    found = sum(len(b) for key, b in table["entries"].items() if key in wanted)
    if not found:
        print("tune: no config gave a correct result; nothing was tuned", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m codegen.cli.tune",
        description="Autotune the SM90 MXFP4 grouped GEMM (same as `python -m codegen tune`).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("tune: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
