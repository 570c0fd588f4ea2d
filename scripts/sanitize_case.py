"""Small cases of every kernel the project launches, for compute-sanitizer (memcheck, racecheck) on the device:

* gemm      every config the op can pick (codegen.tune.selection.configs_under_test: the defaults and the
            shipped tuning tables' choices, both families; W4A8 on e4m3 x and FP8-ready weights; and one of each
            decode family), in both variants: offsets (int32) and masked (int64 masked_m, max_m off the tile);
* quantize  the activation quantizer (both code paths, and [E, max_m, K] x) against its torch composition;
* moe       mxfp4.moe's fused layer as the op runs it: bf16 (five launches, the CUDA graph built, replayed),
            fp8 activations, and expert parallelism's foreign ids;
* fused     the fused layer with every config of ``gemm`` forced in turn: each config's SwiGLU (gate_up) and
            scatter (down) epilogue kernels, the ones the layer can pick through the same tables;
* portable  the Triton in-register kernel of the portable path: every tile config of its tables, both variants.

Every problem has tails (N, K, H, I off the tile) and an empty expert (fixed seeds); the kernels' outputs are poisoned
with NaN first; rows at or past masked_m are undefined and never compared. One line per case ("... ok" or "... FAIL ..."), then a last line:
``sanitize_case: N cases, all ok`` (or ``sanitize_case: K of N cases FAILED: ...``); the exit status is 1 if a
case failed. The sanitizer's own summary (``ERROR SUMMARY: 0 errors`` / ``RACECHECK SUMMARY: 0 hazards``) is
what proves the memory side.

Usage: compute-sanitizer --tool memcheck python scripts/sanitize_case.py [--family bf16|fp8]
           [--cases gemm,quantize,moe,fused,portable] [--list | --compile] [CONFIG ...]
``--family`` keeps one activation family (to split a long run in two), ``--cases`` some kinds of case, CONFIG
names replace the configs of ``gemm`` and ``fused``; ``--list`` prints the cases and runs nothing (no GPU needed);
``--compile`` only compiles the SM90 kernels they load, in parallel, outside the sanitizer (scripts/device_check.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

import mxfp4
from codegen import TileConfig
from codegen.tune.selection import configs_under_test

TOLERANCE = 1e-2  # against float64 (fp32 for the GEMMs' own inputs)
FP8_LAYER_BUDGET = 5e-2  # the layer with fp8 activations against float64 with bf16 activations
KINDS = ("gemm", "quantize", "moe", "fused", "portable")
DEVICE = "cuda"  # the CPU tests run the fused cases on benchmarks.fake_sm90's stand-in with "cpu"


@dataclass
class Case:
    """One check: ``run`` launches and returns ``measure`` (a relative error, or a count of differing values)."""

    name: str
    run: Callable[[], float]
    budget: float = TOLERANCE
    measure: str = "relative error"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """In float64; inf for a NaN (an unwritten, poisoned element) or for output where the reference is all zero."""
    difference, scale = float((out.double() - ref.double()).norm()), float(ref.double().norm())
    if math.isnan(difference):
        return float("inf")
    return difference / scale if scale else (0.0 if difference == 0.0 else float("inf"))


# ---------------------------------------------------------------------------------------------
# gemm


class GemmProblem:
    """E = 3, N = 200, K = 160 with an empty expert; x in bf16 and e4m3, [T, K] and [E, max_m, K]; the weight in both
    layouts."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        num_experts, self.n, self.k = 3, 200, 160
        blocks = torch.randint(0, 256, (num_experts, self.n, self.k // 32, 16), generator=generator, dtype=torch.uint8)
        scales = torch.randint(120, 130, (num_experts, self.n, self.k // 32), generator=generator, dtype=torch.uint8)
        weight = mxfp4.MXFP4Tensor(blocks, scales).to(DEVICE)
        self.plain, self.fp8 = mxfp4.pack(weight), mxfp4.pack(weight, activations="fp8")
        self.w = {"bf16": mxfp4.dequantize(weight, torch.float32),
                  "fp8": mxfp4.dequantize(mxfp4.unpack(self.fp8), torch.float32)}
        self.offsets = torch.tensor([0, 9, 9, 30], dtype=torch.int32, device=DEVICE)
        self.masked_m = torch.tensor([9, 0, 21], dtype=torch.int64, device=DEVICE)  # max_m = 23: off every tile_m
        self.x = {"offsets": torch.randn(30, self.k, generator=generator).to(DEVICE, torch.bfloat16),
                  "masked": torch.randn(3, 23, self.k, generator=generator).to(DEVICE, torch.bfloat16)}
        self.x_fp8 = {variant: mxfp4.quantize_activations(x) for variant, x in self.x.items()}

    def run(self, config: TileConfig, variant: str) -> float:
        """The relative error of one launch of ``config`` against fp32 on its own inputs (rows below masked_m)."""
        from codegen.runtime.launch import EpilogueArgs, grouped_mm_sm90

        masked = variant == "masked"
        rows = self.masked_m if masked else self.offsets
        out = torch.full((*self.x[variant].shape[:-1], self.n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        if config.activations == "fp8":
            x_fp8, x_scale = self.x_fp8[variant]
            grouped_mm_sm90(x_fp8, self.fp8.data, self.n, self.k, rows, masked, config, out,
                            EpilogueArgs(x_scale=x_scale, w_scale=self.fp8.row_scale))
            x = x_fp8.float() * x_scale.unsqueeze(-1)
        else:
            grouped_mm_sm90(self.x[variant], self.plain.data, self.n, self.k, rows, masked, config, out)
            x = self.x[variant].float()
        synchronize()
        w = self.w[config.activations]
        if masked:  # experts 0 and 2, their rows below masked_m
            return relative_error(torch.cat([out[0, :9], out[2, :21]]), torch.cat([x[0, :9] @ w[0].T, x[2, :21] @ w[2].T]))
        return relative_error(out, torch.cat([x[0:9] @ w[0].T, x[9:30] @ w[2].T]))


@cache
def gemm_problem() -> GemmProblem:
    return GemmProblem()


def gemm_cases(configs: list[TileConfig]) -> list[Case]:
    return [Case(f"{config.name} ({variant})", lambda c=config, v=variant: gemm_problem().run(c, v))
            for config in configs for variant in ("offsets", "masked")]


# ---------------------------------------------------------------------------------------------
# quantize


def quantize_differences(shape: tuple[int, ...]) -> float:
    """e4m3 bytes and scales that differ between the quantizer kernel and its torch composition."""
    from mxfp4.ops.activations import quantize_activations_reference

    x = torch.randn(shape, device=DEVICE).bfloat16()
    (got, got_scale), (want, want_scale) = mxfp4.quantize_activations(x), quantize_activations_reference(x)
    return float((got.view(torch.uint8) != want.view(torch.uint8)).sum() + (got_scale != want_scale).sum())


def quantize_cases() -> list[Case]:
    # K % 8 == 0: a row held in registers (K <= 3072) and one in two passes (K = 3080); K = 100: the scalar path;
    # [E, max_m, K] x.
    shapes = ((37, 160), (5, 3080), (37, 100), (3, 23, 160))
    return [Case(f"quantize_activations {list(shape)}", lambda s=shape: quantize_differences(s), budget=0.0,
                 measure="values differing from the torch composition") for shape in shapes]


# ---------------------------------------------------------------------------------------------
# the MoE layer


@dataclass
class Layer:
    """A small gpt-oss layer: H = 160 and I = 96 off the tile, expert 3 empty, biases; ids with a third foreign."""

    x: torch.Tensor
    ids: torch.Tensor
    foreign_ids: torch.Tensor
    weights: torch.Tensor
    gate_up_w: mxfp4.MXFP4Tensor
    down_w: mxfp4.MXFP4Tensor
    biases: list[torch.Tensor]


@cache
def layer() -> Layer:
    generator = torch.Generator().manual_seed(1)
    experts, hidden, inter, tokens, top_k = 4, 160, 96, 13, 2
    gate_up_w = mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.1).to(DEVICE)
    down_w = mxfp4.quantize(torch.randn(experts, hidden, inter, generator=generator) * 0.1).to(DEVICE)
    biases = [torch.randn(experts, size, generator=generator).to(DEVICE, torch.bfloat16) for size in (2 * inter, hidden)]
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE, torch.bfloat16)
    ids = torch.randint(0, experts - 1, (tokens, top_k), generator=generator).to(DEVICE)  # expert 3: empty
    weights = torch.rand(tokens, top_k, generator=generator).to(DEVICE)
    picks = torch.randint(0, 6, ids.shape, generator=generator).to(DEVICE)  # a sixth each: the sentinel E, and -1
    foreign = ids.masked_fill(picks == 0, experts).masked_fill(picks == 1, -1)
    return Layer(x, ids, foreign, weights, gate_up_w, down_w, biases)


@cache
def packed_layer(activations: str) -> tuple[object, object]:
    return (mxfp4.pack_gate_up(layer().gate_up_w, activations=activations),
            mxfp4.pack(layer().down_w, activations=activations))


@cache
def layer_reference(foreign: bool) -> torch.Tensor:
    from mxfp4.experts.layer import reference_moe_float64

    lay = layer()
    ids = lay.foreign_ids if foreign else lay.ids
    return reference_moe_float64(lay.x, ids, lay.weights, lay.gate_up_w, lay.down_w, *lay.biases,
                                 skip_invalid_ids=foreign)


def layer_error(activations: str, foreign: bool = False) -> float:
    """One mxfp4.moe call against float64 (bf16 activations in the reference)."""
    lay = layer()
    gate_up, down = packed_layer(activations)
    out = mxfp4.moe(lay.x.clone(), lay.foreign_ids if foreign else lay.ids, lay.weights, gate_up, down,
                    gate_up_bias=lay.biases[0], down_bias=lay.biases[1], activations=activations,
                    skip_invalid_ids=foreign)
    synchronize()
    return relative_error(out, layer_reference(foreign))


def moe_cases(family: str | None) -> list[Case]:
    """The layer as the op runs it: bf16 call 1 launches the five kernels, call 2 builds the layer's CUDA graph and
    replays it, call 3 replays it (in this order); fp8 activations and foreign ids launch by launch."""
    cases = []
    if family in (None, "fp8"):
        cases.append(Case("moe (fused epilogues, fp8 activations, launches)", lambda: layer_error("fp8"),
                          FP8_LAYER_BUDGET))
    if family in (None, "bf16"):
        cases += [Case(f"moe (fused epilogues, bf16 activations, {how})", lambda: layer_error("bf16"))
                  for how in ("launches", "graph built", "graph replayed")]
        cases.append(Case("moe (fused epilogues, bf16 activations, foreign ids skipped, launches)",
                          lambda: layer_error("bf16", foreign=True)))
    return cases


def fused_error(config: TileConfig) -> float:
    """The layer with ``config`` forced on both GEMMs (its SwiGLU and scatter epilogues), launched one by one."""
    from mxfp4.experts import fused

    with fused.forced_tile_config(config):
        return layer_error(config.activations)


def fused_cases(configs: list[TileConfig]) -> list[Case]:
    return [Case(f"moe fused {config.name} (_swiglu + _scatter)", lambda c=config: fused_error(c),
                 FP8_LAYER_BUDGET if config.activations == "fp8" else TOLERANCE) for config in configs]


def fused_kernels(configs: list[TileConfig]) -> list[TileConfig]:
    return [dataclasses.replace(c, epilogue=epilogue) for c in configs for epilogue in ("swiglu", "scatter")]


# ---------------------------------------------------------------------------------------------
# the portable kernel


@cache
def portable_problem() -> tuple:
    from mxfp4.format.reference import (
        reference_grouped_mm_float64,
        reference_grouped_mm_masked_float64,
    )

    generator = torch.Generator().manual_seed(2)
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(3, 200, 160, generator=generator) * 0.1)).to(DEVICE)
    offsets = torch.tensor([0, 9, 9, 30], dtype=torch.int32, device=DEVICE)
    x = torch.randn(30, 160, generator=generator).to(DEVICE, torch.bfloat16)
    xm = torch.randn(3, 7, 160, generator=generator).to(DEVICE, torch.bfloat16)
    masked = torch.tensor([7, 0, 3], dtype=torch.int32, device=DEVICE)
    return packed, offsets, x, xm, masked, reference_grouped_mm_float64(x, packed, offsets), \
        reference_grouped_mm_masked_float64(xm, packed)


def portable_error(config: object) -> float:
    """Both variants of the Triton kernel with ``config`` (rows below masked_m compared)."""
    from mxfp4.portable import kernel as portable_kernel

    packed, offsets, x, xm, masked, ref, ref_masked = portable_problem()
    out = torch.full((30, 200), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    out_masked = torch.full((3, 7, 200), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    portable_kernel.launch(x, packed.data, 200, 160, offsets, False, out, config)
    portable_kernel.launch(xm, packed.data, 200, 160, masked, True, out_masked, config)
    synchronize()
    rows, want = torch.cat([out_masked[0, :7], out_masked[2, :3]]), torch.cat([ref_masked[0, :7], ref_masked[2, :3]])
    return max(relative_error(out, ref), relative_error(rows, want))


def portable_cases() -> list[Case]:
    from mxfp4.portable import kernel as portable_kernel

    tables = (portable_kernel.HOPPER_CONFIGS, portable_kernel.OTHER_CONFIGS)
    configs = sorted({config for table in tables for _, config in table}, key=lambda c: c.name)
    return [Case(f"portable {config.name} (offsets + masked)", lambda c=config: portable_error(c)) for config in configs]


# ---------------------------------------------------------------------------------------------
# the run


def plan(family: str | None, kinds: set[str], configs: list[TileConfig]) -> list[Case]:
    """The cases of ``kinds`` for ``family`` (None: both), in the order they run."""
    configs = [c for c in configs if family in (None, c.activations)]
    cases = gemm_cases(configs) if "gemm" in kinds else []
    if "quantize" in kinds and family in (None, "fp8"):
        cases += quantize_cases()
    if "moe" in kinds:
        cases += moe_cases(family)
    if "fused" in kinds:
        cases += fused_cases(configs)
    if "portable" in kinds and family in (None, "bf16"):
        cases += portable_cases()
    return cases


def precompile(configs: list[TileConfig], kinds: set[str]) -> list[str]:
    """The SM90 kernels the cases load, compiled in parallel processes first (into the disk cache, so a run under
    the sanitizer after ``--compile`` only reads them); returns the names that failed to compile."""
    from codegen.build.compiler import compile_many

    kernels = (configs if "gemm" in kinds else []) + (fused_kernels(configs) if "fused" in kinds else [])
    started = time.time()
    failed = [c.name for c, r in zip(kernels, compile_many(kernels, progress=False)) if isinstance(r, Exception)]
    print(f"sanitize_case: {len(kernels)} SM90 kernels ready in {time.time() - started:.0f} s"
          + (f"; failed to compile (their cases will FAIL): {', '.join(failed)}" if failed else ""), flush=True)
    return failed


def run_case(case: Case) -> bool:
    try:
        value = case.run()
    except Exception as error:  # noqa: BLE001 (a case that raises is a failure of its own; the rest still run)
        print(f"{case.name}: FAIL ({type(error).__name__}: {str(error)[:300]})", flush=True)
        return False
    ok = value <= case.budget
    print(f"{case.name}: {case.measure} {value:.2e} {'ok' if ok else f'FAIL (budget {case.budget:g})'}", flush=True)
    return ok


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("bf16", "fp8"))
    parser.add_argument("--cases", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--list", action="store_true", help="print the cases, run nothing")
    parser.add_argument("--compile", action="store_true", help="only compile the SM90 kernels the cases load")
    parser.add_argument("configs", nargs="*", metavar="CONFIG")
    args = parser.parse_args(arguments)
    kinds = set(args.cases.split(","))
    if not kinds <= set(KINDS):
        parser.error(f"--cases: unknown {sorted(kinds - set(KINDS))}; of {', '.join(KINDS)}")
    configs = [TileConfig.from_name(n) for n in args.configs] if args.configs else configs_under_test()
    cases = plan(args.family, kinds, configs)
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    not_compiled = precompile([c for c in configs if args.family in (None, c.activations)], kinds)
    if args.compile:
        return 1 if not_compiled else 0
    failed = [case.name for case in cases if not run_case(case)]
    if failed:
        print(f"sanitize_case: {len(failed)} of {len(cases)} cases FAILED: {', '.join(failed)}")
        return 1
    print(f"sanitize_case: {len(cases)} cases, all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
