"""Side-by-side timing of the MXFP4 grouped GEMM on the gpt-oss MoE shapes.

    python benchmarks/bench_grouped_mm.py [--quick] [--out DIR]

In one run, on the same GPU: the HBM read bandwidth and the bf16 tensor-core rate (the floors),
then for gpt-oss-20b and -120b (gate_up N=5760, down N=2880, K=2880) at M tokens per expert,
with uniform routing and with a skewed "Zipf" routing of the same total (top-4 of E, expert loads
proportional to 1 / rank^1.1, no expert above the token count), these paths:

* ``mxfp4 sm90``: our kernel, best of a few configs (the tuning table's choice, the heuristic's,
  and the default configs whose tile_m is within 2x of M); the row names the winner;
* ``torch bf16``: ``torch._grouped_mm`` on the dequantized bf16 weights (what a bf16 checkpoint
  costs: 4x the weight bytes);
* ``portable``: mxfp4's portable path (decode in torch + bf16 matmul per expert), what runs
  off-Hopper.

Per row: median device time (CUDA events, inputs rotated past the L2, see ``codegen.timing``),
TFLOP/s, GB/s on the bytes that must move (``codegen.timing.grouped_mm_bytes``), time / floor with
floor = max(bytes / measured read BW, FLOPs / measured bf16 peak), and the speedup over bf16.
Writes ``bench_grouped_mm.json`` and (with matplotlib) ``bench_grouped_mm.png`` to ``--out`` and
prints the table last. ``main(argv)`` is the entry point for a ``bench`` verb.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codegen.timing import floor_us, grouped_mm_bytes, grouped_mm_flops  # noqa: E402
from codegen.tuning import MODEL_SHAPES, Shape  # noqa: E402

M_VALUES = (1, 4, 16, 64, 256, 1024, 4096)
QUICK_M_VALUES = (1, 16, 256, 4096)
TOP_K = 4
ZIPF_EXPONENT = 1.1
TOLERANCE = 1e-2
PATHS = ("mxfp4 sm90", "torch bf16", "portable")
DEVICE = "cuda"  # the tests' CPU dry run replaces it

# ---------------------------------------------------------------------------------------------
# Routing and arithmetic (CPU, tested)
# ---------------------------------------------------------------------------------------------


def zipf_loads(num_experts: int, tokens_per_expert: int, *, top_k: int = TOP_K, exponent: float = ZIPF_EXPONENT,
               seed: int = 0) -> list[int]:
    """Rows per expert of a skewed top-k routing with the same total as ``tokens_per_expert`` uniform rows.

    ``E * M`` assignments of ``ceil(E * M / top_k)`` tokens; expert loads proportional to
    ``1 / rank^exponent``, each at most the token count (a token picks an expert once), the excess
    spread over the others in proportion; integer by largest remainder; ranks assigned to experts
    by a seeded shuffle.
    """
    total = num_experts * tokens_per_expert
    if total == 0:
        return [0] * num_experts
    top_k = max(1, min(top_k, num_experts))
    cap = math.ceil(total / top_k)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(num_experts)]
    shares = [0.0] * num_experts
    free = set(range(num_experts))
    left = float(total)
    while free:
        weight_sum = sum(weights[i] for i in free)
        over = [i for i in free if left * weights[i] / weight_sum > cap]
        if not over:
            for i in free:
                shares[i] = left * weights[i] / weight_sum
            break
        for i in over:
            shares[i] = float(cap)
            left -= cap
            free.discard(i)
    loads = [min(cap, math.floor(s)) for s in shares]
    missing = total - sum(loads)
    order = sorted(range(num_experts), key=lambda i: (shares[i] - math.floor(shares[i]), -i), reverse=True)
    for i in order:
        if missing <= 0:
            break
        if loads[i] < cap:
            loads[i] += 1
            missing -= 1
    permutation = list(range(num_experts))
    random.Random(seed).shuffle(permutation)
    by_expert = [0] * num_experts
    for rank, expert in enumerate(permutation):
        by_expert[expert] = loads[rank]
    return by_expert


def row_arithmetic(shape: Shape, loads: Sequence[int]) -> tuple[int, int]:
    """(bytes that must move, FLOPs) of one grouped GEMM with these rows per expert."""
    tokens = sum(loads)
    active = sum(1 for load in loads if load > 0)
    return grouped_mm_bytes(active, shape.n, shape.k, tokens), grouped_mm_flops(tokens, shape.n, shape.k)


def memory_needed(shape: Shape, tokens: int) -> int:
    """Bytes a row of this benchmark holds at once on the GPU (weights both ways, x, four outputs, slack)."""
    e, n, k = shape.num_experts, shape.n, shape.k
    packed = e * -(-n // 64) * -(-k // 64) * 2176
    return packed + e * n * k * 2 + tokens * k * 2 + 4 * tokens * n * 2 + (2 << 30)  # + decode temporaries


# ---------------------------------------------------------------------------------------------
# Results and the table
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    projection: str
    shape: Shape
    routing: str
    m: int
    loads: list[int]
    nbytes: int
    flops: int
    floor_us: float
    results: dict[str, dict[str, Any]]
    check_rel: float | None = None

    @property
    def tokens(self) -> int:
        return sum(self.loads)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "projection": self.projection, "E": self.shape.num_experts, "N": self.shape.n,
            "K": self.shape.k, "routing": self.routing, "m": self.m, "tokens": self.tokens,
            "max_load": max(self.loads) if self.loads else 0,
            "active_experts": sum(1 for v in self.loads if v), "bytes": self.nbytes, "flops": self.flops,
            "floor_us": self.floor_us, "check_rel": self.check_rel, "results": self.results,
        }


def derived(result: dict[str, Any], row: Row, bf16_us: float | None) -> dict[str, Any]:
    """TFLOP/s, GB/s, time / floor and speedup over bf16 of one timed result."""
    us = result.get("median_us")
    if not us:
        return {}
    return {
        "tflops": row.flops / (us * 1e-6) / 1e12,
        "gbps": row.nbytes / (us * 1e-6) / 1e9,
        "x_floor": us / row.floor_us if row.floor_us > 0 else float("nan"),
        "speedup_vs_bf16": (bf16_us / us) if bf16_us else None,
    }


def format_table(rows: Sequence[Row]) -> str:
    header = ("shape", "routing", "M", "path", "config", "us", "TFLOP/s", "GB/s", "x floor", "vs bf16")
    lines = []
    for row in rows:
        bf16 = row.results.get("torch bf16", {}).get("median_us")
        for path in PATHS:
            result = row.results.get(path)
            if result is None:
                continue
            shape = f"{row.model} {row.projection}"
            routing = row.routing if row.routing == "uniform" else f"{row.routing} (max {max(row.loads)})"
            if result.get("median_us"):
                d = derived(result, row, bf16)
                config = result.get("config", "")
                lines.append((shape, routing, str(row.m), path, config, f"{result['median_us']:.1f}",
                              f"{d['tflops']:.1f}", f"{d['gbps']:.0f}", f"{d['x_floor']:.2f}",
                              f"{d['speedup_vs_bf16']:.2f}x" if d["speedup_vs_bf16"] else "-"))
            else:
                lines.append((shape, routing, str(row.m), path, str(result.get("error", "not run"))[:60],
                              "-", "-", "-", "-", "-"))
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
    left = {0, 1, 3, 4}
    fmt = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(line) for line in lines)])


def plot(rows: Sequence[Row], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; skipping the plot (pip install 'hopper-mxfp4[bench]')", file=sys.stderr)
        return None
    panels = list(dict.fromkeys((row.model, row.projection) for row in rows))
    columns = min(2, len(panels))
    figure, axes = plt.subplots(-(-len(panels) // columns), columns, figsize=(6.5 * columns, 4.5 * -(-len(panels) // columns)),
                                squeeze=False)
    colours = {"mxfp4 sm90": "tab:blue", "torch bf16": "tab:orange", "portable": "tab:green"}
    for axis, panel in zip(axes.flat, panels):
        mine = [row for row in rows if (row.model, row.projection) == panel]
        for routing, style in (("uniform", "-"), ("zipf", "--")):
            chosen = [row for row in mine if row.routing == routing]
            for name in PATHS:
                points = [(row.m, row.results[name]["median_us"]) for row in chosen
                          if row.results.get(name, {}).get("median_us")]
                if points:
                    axis.plot(*zip(*points), style, marker="o", color=colours[name], label=f"{name} ({routing})")
            floor = [(row.m, row.floor_us) for row in chosen]
            if floor and routing == "uniform":
                axis.plot(*zip(*floor), ":", color="black", label="floor (uniform)")
        shape = mine[0].shape
        axis.set_title(f"{panel[0]} {panel[1]}: E={shape.num_experts} N={shape.n} K={shape.k}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens per expert (M)")
        axis.set_ylabel("time (us)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------
# The GPU part
# ---------------------------------------------------------------------------------------------


def candidate_configs(shape: Shape, tokens_per_expert: int, device_name: str | None) -> list[tuple[Any, str]]:
    """(config, why) to try for our kernel: the selection's, the heuristic's, defaults near M. At most ~5."""
    from codegen.config import DEFAULT_CONFIGS
    from codegen.selection import heuristic_config, select_config

    found: dict[str, tuple[Any, str]] = {}
    selection = select_config(shape.num_experts, shape.n, shape.k, tokens_per_expert, device_name=device_name)
    found[selection.config.name] = (selection.config, f"selected: {selection.reason}")
    heuristic = heuristic_config(tokens_per_expert)
    found.setdefault(heuristic.name, (heuristic, "heuristic default"))
    effective = max(8, tokens_per_expert)
    for config in DEFAULT_CONFIGS:
        if effective / 2 <= config.tile_m <= effective * 2:
            found.setdefault(config.name, (config, "default config with tile_m within 2x of M"))
    return list(found.values())


class _Watchdog:
    """If one measurement hangs (a kernel that never finishes), save what was measured and exit."""

    def __init__(self, seconds: float, save):
        self.seconds, self.save, self.timer = seconds, save, None

    def __enter__(self):
        if self.seconds > 0:
            self.timer = threading.Timer(self.seconds, self._fire)
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc):
        if self.timer:
            self.timer.cancel()

    def _fire(self):
        print(f"\nbench: a measurement took over {self.seconds:.0f} s (kernel hang?); saving partial results and exiting",
              file=sys.stderr, flush=True)
        try:
            self.save(partial=True)
        finally:
            os._exit(3)


def _healthy() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        return float(torch.ones(2, device="cuda").sum().item()) == 2.0
    except Exception:
        return False


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def _rel(a, b) -> float:
    """||a - b|| / ||b||, a row chunk at a time (the outputs can be gigabytes)."""
    rows = max(1, (1 << 26) // max(1, a.shape[-1]))
    diff2 = ref2 = 0.0
    for r0 in range(0, a.shape[0], rows):
        got, want = a[r0 : r0 + rows].float(), b[r0 : r0 + rows].float()
        diff2 += float((got - want).double().square().sum())
        ref2 += float(want.double().square().sum())
    if not math.isfinite(diff2):
        return float("inf")
    return math.sqrt(diff2 / ref2) if ref2 > 0 else (0.0 if diff2 == 0 else float("inf"))


def _torch_grouped_mm_layouts(dequantized):
    """[E, K, N] operands for torch._grouped_mm: the transposed view (K-major, no copy), then a copy."""
    yield "transposed view of [E, N, K]", lambda: dequantized.transpose(1, 2)
    yield "contiguous [E, K, N]", lambda: dequantized.transpose(1, 2).contiguous()


def run_row(row: Row, packed, dequantized, *, candidates, sm90_reason: str | None, timing_args: dict,
            portable_timing_args: dict | None, save) -> None:
    """Time every path of one row into ``row.results`` (errors are recorded, never raised, except a
    lost CUDA context, which raises RuntimeError after recording)."""
    import torch

    import mxfp4
    from codegen.timing import l2_cache_bytes, rotation_sets, time_cuda
    from mxfp4.reference import portable_grouped_mm

    shape, loads = row.shape, row.loads
    n, k = shape.n, shape.k
    tokens = row.tokens
    device = packed.data.device
    x = torch.randn((tokens, k), device=device, dtype=torch.bfloat16)
    bounds = [0]
    for load in loads:
        bounds.append(bounds[-1] + load)
    offsets = torch.tensor(bounds, dtype=torch.int32, device=device)
    ends = offsets[1:].contiguous()  # torch._grouped_mm takes the E end offsets
    cuda = device.type == "cuda"  # (False only in the CPU dry run of the tests)
    l2 = l2_cache_bytes()
    budget = min(4 << 30, int(torch.cuda.mem_get_info()[0] * 0.2)) if cuda else 8 << 20
    reference = None  # the bf16 baseline's output (else the portable path's): the cross-check of ours

    # torch._grouped_mm on the bf16 weights.
    errors = []
    for layout, make in _torch_grouped_mm_layouts(dequantized):
        try:
            first = make()
            reference = torch._grouped_mm(x, first, offs=ends)
            if cuda:
                torch.cuda.synchronize()
            sets = rotation_sets(dequantized.numel() * 2 + tokens * (k + n) * 2, l2_bytes=l2, memory_budget=budget)
            rotate = [(x, first)] + [(x, make() if layout.startswith("contiguous") else dequantized.clone().transpose(1, 2))
                                     for _ in range(sets - 1)]
            with _Watchdog(timing_args["watchdog"], save):
                timing = time_cuda(lambda xi, wi: torch._grouped_mm(xi, wi, offs=ends), rotate=rotate, **timing_args["time"])
            row.results["torch bf16"] = {**timing.as_dict(), "layout": layout, "rotation_sets": sets}
            del first, rotate
            break
        except Exception as error:  # torch without _grouped_mm, or a layout it rejects
            errors.append(f"{layout}: {_error(error)}")
            reference = None
            if not _healthy():
                row.results["torch bf16"] = {"error": f"CUDA context lost: {'; '.join(errors)}"}
                raise RuntimeError(f"the CUDA context is unusable after torch._grouped_mm failed: {errors[-1]}") from error
    else:
        row.results["torch bf16"] = {"error": f"unavailable: {'; '.join(errors)}"}

    if sm90_reason is None:
        if reference is None:
            reference = torch.empty((tokens, n), dtype=torch.bfloat16, device=device)
            portable_grouped_mm(x, packed.data, n, k, offsets, reference)
        sets = rotation_sets(packed.data.numel() + tokens * (k + n) * 2, l2_bytes=l2, memory_budget=budget)
        rotate = [(x, packed)] + [(x, mxfp4.PackedMXFP4(packed.data.clone(), n, k)) for _ in range(sets - 1)]
        tried: dict[str, Any] = {}
        for config, why in candidates:
            try:
                with _Watchdog(timing_args["watchdog"], save):
                    out = mxfp4.grouped_mm(x, packed, offsets, config=config)
                    rel = _rel(out, reference)
                    del out
                    if rel <= TOLERANCE:
                        timing = time_cuda(lambda xi, wi: mxfp4.grouped_mm(xi, wi, offsets, config=config),
                                           rotate=rotate, **timing_args["time"])
                        tried[config.name] = {**timing.as_dict(), "why": why, "rel_vs_reference": rel}
                    else:
                        tried[config.name] = {"error": f"wrong result: rel. error {rel:.2e} vs the reference", "why": why,
                                              "rel_vs_reference": rel}
            except Exception as error:
                tried[config.name] = {"error": _error(error), "why": why}
                if not _healthy():
                    row.results["mxfp4 sm90"] = {"error": f"CUDA context lost: {_error(error)}", "candidates": tried}
                    raise RuntimeError(f"the CUDA context is unusable after {config.name} failed: {_error(error)}") from error
        good = {name: r for name, r in tried.items() if r.get("median_us")}
        if good:
            name = min(good, key=lambda c: good[c]["median_us"])
            row.results["mxfp4 sm90"] = {**good[name], "config": name, "rotation_sets": sets, "candidates": tried}
            row.check_rel = good[name]["rel_vs_reference"]
        else:
            summary = "; ".join(f"{c}: {r['error']}" for c, r in tried.items())
            row.results["mxfp4 sm90"] = {"error": f"no correct config ({summary})", "candidates": tried}
        del rotate
    else:
        row.results["mxfp4 sm90"] = {"error": f"not run: {sm90_reason}"}
    del reference

    if portable_timing_args is None:
        row.results["portable"] = {"error": "skipped (--no-portable)"}
    else:
        try:
            out = torch.empty((tokens, n), dtype=torch.bfloat16, device=device)
            with _Watchdog(timing_args["watchdog"], save):
                timing = time_cuda(lambda: portable_grouped_mm(x, packed.data, n, k, offsets, out), **portable_timing_args)
            row.results["portable"] = timing.as_dict()
            del out
        except Exception as error:
            row.results["portable"] = {"error": _error(error)}
            if not _healthy():
                raise RuntimeError(f"the CUDA context is unusable after the portable path failed: {_error(error)}") from error
    del x


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="bench_grouped_mm.py",
        description="Time the MXFP4 grouped GEMM (our SM90 kernel, best of a few configs) against torch._grouped_mm on "
        "bf16 weights and the portable path, on the gpt-oss MoE shapes, with uniform and Zipf routing; also measures "
        "the HBM read bandwidth and the bf16 peak of this GPU for the floors. Writes JSON (+ PNG with matplotlib) and "
        "prints the table last.",
        epilog="examples:\n  python benchmarks/bench_grouped_mm.py --quick\n"
        "  python benchmarks/bench_grouped_mm.py --out /tmp/bench\n"
        "  python benchmarks/bench_grouped_mm.py --model gpt-oss-120b --m 1,16,256",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"gpt-oss-20b only, M in {','.join(map(str, QUICK_M_VALUES))}, fewer reps (~2 min on H100)")
    parser.add_argument("--out", metavar="DIR", default="bench-results", help="where to write the JSON and PNG (default ./bench-results)")
    parser.add_argument("--model", action="append", choices=sorted(MODEL_SHAPES), default=[],
                        help="models to run (default: both; --quick: gpt-oss-20b)")
    parser.add_argument("--m", metavar="M,...", help=f"tokens per expert (default {','.join(map(str, M_VALUES))})")
    parser.add_argument("--routing", choices=("uniform", "zipf", "both"), default="both", help="routings to run (default both)")
    parser.add_argument("--rep", type=int, default=None, metavar="N", help="timed calls per measurement (default 50; --quick 20)")
    parser.add_argument("--no-portable", action="store_true", help="skip the portable path (slow at large M)")
    parser.add_argument("--watchdog", type=float, default=120.0, metavar="S",
                        help="seconds one measurement may take before the run saves and exits (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="random data and routing seed")


def register(subparsers) -> argparse.ArgumentParser:
    """Add a ``bench`` verb to ``subparsers`` (``python -m codegen bench``); its handler is :func:`run`."""
    template = build_parser()
    parser = subparsers.add_parser("bench", help="side-by-side timing: our kernel vs torch bf16 vs the portable path",
                                   description=template.description, epilog=template.epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments; 2 on a bad --m or without a CUDA GPU."""
    try:
        m_values = [int(v) for v in args.m.split(",") if v] if args.m else list(QUICK_M_VALUES if args.quick else M_VALUES)
    except ValueError:
        m_values = []
    if not m_values or min(m_values) < 1:
        print(f"bench: error: --m {args.m!r}: give comma-separated positive integers", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("bench needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    return _run(args, m_values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _run(args: argparse.Namespace, m_values: list[int]) -> int:
    import torch

    from codegen.timing import measure_bf16_peak, measure_hbm_read_bandwidth
    from codegen.sweep import random_weights
    from mxfp4.dispatch import SM90, select_path

    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    capability = torch.cuda.get_device_capability()
    device = torch.device(DEVICE)
    choice = select_path(device)
    sm90_reason = None if choice.path == SM90 else choice.reason
    models = args.model or (["gpt-oss-20b"] if args.quick else sorted(MODEL_SHAPES))
    routings = ["uniform", "zipf"] if args.routing == "both" else [args.routing]
    rep = args.rep or (20 if args.quick else 50)
    timing_args = {"time": {"warmup_ms": 10.0 if args.quick else 25.0, "rep": rep, "max_ms": 300.0 if args.quick else 1000.0},
                   "watchdog": args.watchdog}
    # The portable path reads offsets on the host (a sync per call): running ahead cannot help it.
    portable_timing_args = {"warmup_ms": 0.0, "rep": 5 if args.quick else 10, "min_rep": 3, "max_ms": 500.0,
                            "run_ahead": False}
    started = time.time()
    print(f"bench: {device_name} (sm_{capability[0]}{capability[1]}), torch {torch.__version__}; our path: "
          f"{choice.path} ({choice.reason})", file=sys.stderr)

    bandwidth = measure_hbm_read_bandwidth()
    peak = measure_bf16_peak()
    free_memory = (lambda: torch.cuda.mem_get_info()[0]) if device.type == "cuda" else (lambda: 64 << 30)
    print(f"bench: HBM read {bandwidth.value / 1e12:.2f} TB/s ({bandwidth.method}); bf16 peak "
          f"{peak.value / 1e12:.0f} TFLOP/s ({peak.method})", file=sys.stderr)

    rows: list[Row] = []
    skipped: list[str] = []
    result: dict[str, Any] = {}

    def save(partial: bool = False) -> Path:
        result.update({
            "device": device_name, "capability": list(capability), "torch": torch.__version__,
            "python": platform.python_version(), "our_path": {"path": choice.path, "reason": choice.reason},
            "hbm_read": bandwidth.as_dict(), "bf16_peak": peak.as_dict(), "m_values": m_values,
            "seconds": round(time.time() - started, 1), "partial": partial, "skipped": skipped,
            "rows": [row.as_dict() for row in list(rows)],
        })
        path = out_dir / "bench_grouped_mm.json"
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        return path

    # Compile every candidate up front, in parallel (disk-cached), so no timing waits for NVRTC.
    plan = [(model, projection, shape) for model in models for projection, shape in MODEL_SHAPES[model].items()]
    if sm90_reason is None:
        from codegen.compiler import compile_many

        wanted = {c.name: c for _, _, shape in plan for m in m_values for c, _ in candidate_configs(shape, m, device_name)}
        compiled = compile_many(list(wanted.values()), progress=True)
        for config, kernel in zip(wanted.values(), compiled):
            if isinstance(kernel, Exception):
                print(f"bench: {config.name} does not compile: {_error(kernel)}", file=sys.stderr)

    lost = False
    for model, projection, shape in plan:
        if lost:
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
        fits = [m for m in m_values if memory_needed(shape, shape.num_experts * m) <= 0.9 * free_memory()]
        for m in m_values:
            if m not in fits:
                need = memory_needed(shape, shape.num_experts * m) / 2**30
                skipped.append(f"{model} {projection} M={m}: needs ~{need:.0f} GiB, more than 90% of the free memory")
                print(f"bench: skipping {skipped[-1]}", file=sys.stderr)
        if not fits:
            continue
        print(f"bench: {model} {projection} ({shape.label}): building weights", file=sys.stderr)
        packed, dequantized = random_weights(shape, device, seed=args.seed)
        for m in fits:
            for routing in routings:
                loads = [m] * shape.num_experts if routing == "uniform" else zipf_loads(shape.num_experts, m, seed=args.seed + m)
                nbytes, flops = row_arithmetic(shape, loads)
                row = Row(model, projection, shape, routing, m, loads, nbytes, flops,
                          floor_us(nbytes, flops, bandwidth.value, peak.value), {})
                rows.append(row)
                hint = -(-sum(loads) // shape.num_experts)
                print(f"bench: {model} {projection} M={m} {routing}", file=sys.stderr)
                try:
                    run_row(row, packed, dequantized, candidates=candidate_configs(shape, hint, device_name),
                            sm90_reason=sm90_reason, timing_args=timing_args,
                            portable_timing_args=None if args.no_portable else portable_timing_args, save=save)
                except RuntimeError as error:  # the CUDA context is gone: keep what was measured
                    print(f"bench: {error}; stopping", file=sys.stderr)
                    lost = True
                    break
            if lost:
                break
        del packed, dequantized
        if device.type == "cuda":
            torch.cuda.empty_cache()

    json_path = save(partial=lost)
    title = (f"{device_name}: HBM read {bandwidth.value / 1e12:.2f} TB/s, bf16 {peak.value / 1e12:.0f} TFLOP/s "
             f"(measured); solid uniform, dashed zipf")
    png = plot(rows, out_dir / "bench_grouped_mm.png", title) if rows else None
    print(f"bench: wrote {json_path}" + (f" and {png}" if png else ""), file=sys.stderr)
    print(f"device: {device_name}; HBM read {bandwidth.value / 1e12:.2f} TB/s; bf16 peak {peak.value / 1e12:.0f} TFLOP/s; "
          f"{time.time() - started:.0f} s")
    for note in skipped:
        print(f"skipped: {note}")
    print(format_table(rows))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
