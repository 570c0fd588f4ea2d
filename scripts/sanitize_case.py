"""One small grouped GEMM per config the op can pick (defaults + shipped tuning tables; the W4A8 ones on e4m3 x
and FP8-ready weights) and per kernel family (codegen.tune.selection.FAMILY_SAMPLES), the activation quantizer, the
fused MoE layer (SwiGLU and scatter epilogues, bf16 and fp8 activations; also with foreign expert ids, as expert
parallelism passes them), and the portable in-register kernel (forced: every tile config of its table, both
variants), for compute-sanitizer (memcheck, racecheck) on the device.

Usage: compute-sanitizer --tool memcheck python scripts/sanitize_case.py [--family bf16|fp8] [CONFIG ...]
``--family`` keeps the configs, quantizer and layer of one activation family (to split a long run in two).
Exits non-zero if a result is off (the sanitizer's own report is what the device script reads).
"""

from __future__ import annotations

import sys

import torch

import mxfp4
from codegen import TileConfig
from codegen.runtime.launch import EpilogueArgs, grouped_mm_sm90
from codegen.tune.selection import configs_under_test

TOLERANCE = 1e-2


class Problem:
    """N and K tails, an empty expert; the weight in both layouts, x in bf16 and quantized to e4m3."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        num_experts, self.n, self.k = 3, 200, 160
        blocks = torch.randint(0, 256, (num_experts, self.n, self.k // 32, 16), generator=generator, dtype=torch.uint8)
        scales = torch.randint(120, 130, (num_experts, self.n, self.k // 32), generator=generator, dtype=torch.uint8)
        weight = mxfp4.MXFP4Tensor(blocks, scales).to("cuda")
        self.plain, self.fp8 = mxfp4.pack(weight), mxfp4.pack(weight, activations="fp8")
        self.offsets = torch.tensor([0, 9, 9, 30], dtype=torch.int32, device="cuda")
        self.x = torch.randn(30, self.k, generator=generator).to("cuda", torch.bfloat16)
        self.x_fp8, self.x_scale = mxfp4.quantize_activations(self.x)
        self.w = mxfp4.dequantize(weight, torch.float32)
        self.w_fp8 = mxfp4.dequantize(mxfp4.unpack(self.fp8), torch.float32)

    def run(self, config: TileConfig) -> float:
        """The relative error of one launch of ``config`` against fp32 on its own inputs."""
        out = torch.full((self.x.shape[0], self.n), float("nan"), dtype=torch.bfloat16, device="cuda")
        if config.activations == "fp8":
            grouped_mm_sm90(self.x_fp8, self.fp8.data, self.n, self.k, self.offsets, False, config, out,
                            EpilogueArgs(x_scale=self.x_scale, w_scale=self.fp8.row_scale))
            x, w = self.x_fp8.float() * self.x_scale.unsqueeze(1), self.w_fp8
        else:
            grouped_mm_sm90(self.x, self.plain.data, self.n, self.k, self.offsets, False, config, out)
            x, w = self.x.float(), self.w
        torch.cuda.synchronize()
        ref = torch.cat([x[0:9] @ w[0].T, x[9:30] @ w[2].T])
        return ((out.float() - ref).norm() / ref.norm()).item()


def main(arguments: list[str]) -> int:
    family = None
    if arguments[:1] == ["--family"]:
        family, arguments = arguments[1], arguments[2:]
    configs = [TileConfig.from_name(n) for n in arguments] if arguments else configs_under_test()
    configs = [c for c in configs if family in (None, c.activations)]
    problem = Problem()
    failures = 0
    for config in configs:
        error = problem.run(config)
        ok = error <= TOLERANCE
        failures += not ok
        print(f"{config.name}: relative error {error:.2e} {'ok' if ok else 'FAIL'}")
    if family in (None, "fp8"):
        failures += quantize_case() + moe_case("fp8")
    if family in (None, "bf16"):
        failures += moe_case("bf16") + moe_case("bf16", foreign=True) + portable_case()
    return 1 if failures else 0


def quantize_case() -> int:
    """The quantizer kernel on rows of both paths (K a multiple of 8, and not), against its torch composition."""
    from mxfp4.ops.activations import quantize_activations_reference

    bad = 0
    for k in (160, 100):
        x = torch.randn(37, k, device="cuda").bfloat16()
        got, want = mxfp4.quantize_activations(x), quantize_activations_reference(x)
        same = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
        print(f"quantize_activations K={k}: {'ok' if same else 'FAIL (differs from the torch composition)'}")
        bad += not same
    return bad


def moe_case(activations: str, foreign: bool = False) -> int:
    """The fused layer on a small problem with tails (H, I not multiples of 64), an empty expert, biases;
    ``foreign``: a third of the choices carry ids outside [0, E) (the sentinel E, -1), skipped."""
    from mxfp4.experts.layer import reference_moe_float64

    generator = torch.Generator().manual_seed(1)
    experts, hidden, inter, tokens, top_k = 4, 160, 96, 13, 2
    gate_up_w = mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.1).to("cuda")
    down_w = mxfp4.quantize(torch.randn(experts, hidden, inter, generator=generator) * 0.1).to("cuda")
    gate_up = mxfp4.pack_gate_up(gate_up_w, activations=activations)
    down = mxfp4.pack(down_w, activations=activations)
    biases = [torch.randn(experts, size, generator=generator).to("cuda", torch.bfloat16) for size in (2 * inter, hidden)]
    x = torch.randn(tokens, hidden, generator=generator).to("cuda", torch.bfloat16)
    ids = torch.randint(0, experts - 1, (tokens, top_k), generator=generator).to("cuda")  # expert 3: empty
    weights = torch.rand(tokens, top_k, generator=generator).to("cuda")
    if foreign:  # a sixth of the choices each: the sentinel E, and -1
        picks = torch.randint(0, 6, ids.shape, generator=generator).to("cuda")
        ids = ids.masked_fill(picks == 0, experts).masked_fill(picks == 1, -1)
    ref = reference_moe_float64(x, ids, weights, gate_up_w, down_w, *biases, skip_invalid_ids=foreign)
    budget = TOLERANCE if activations == "bf16" else 5e-2  # fp8: against float64 with bf16 activations
    failures = 0
    # bf16: call 1 launches the five kernels; call 2 builds the layer's CUDA graph and replays it; call 3 replays it.
    hows = ("launches", "graph built", "graph replayed") if activations == "bf16" and not foreign else ("launches",)
    label = f"{activations} activations" + (", foreign ids skipped" if foreign else "")
    for how in hows:
        out = mxfp4.moe(x.clone(), ids, weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1],
                        activations=activations, skip_invalid_ids=foreign)
        error = ((out.double() - ref).norm() / ref.norm()).item()
        failures += not error <= budget
        print(f"moe (fused epilogues, {label}, {how}): relative error {error:.2e} {'ok' if error <= budget else 'FAIL'}")
    return failures


def portable_case() -> int:
    """The Triton kernel of the forced portable path: tails (N = 200, K = 160), an empty expert, every config."""
    from mxfp4.format.reference import (
        reference_grouped_mm_float64,
        reference_grouped_mm_masked_float64,
    )
    from mxfp4.portable import kernel as portable_kernel

    generator = torch.Generator().manual_seed(2)
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(3, 200, 160, generator=generator) * 0.1)).to("cuda")
    offsets = torch.tensor([0, 9, 9, 30], dtype=torch.int32, device="cuda")
    x = torch.randn(30, 160, generator=generator).to("cuda", torch.bfloat16)
    xm = torch.randn(3, 7, 160, generator=generator).to("cuda", torch.bfloat16)
    masked = torch.tensor([7, 0, 3], dtype=torch.int32, device="cuda")
    ref, ref_masked = reference_grouped_mm_float64(x, packed, offsets), reference_grouped_mm_masked_float64(xm, packed)
    configs = {config for table in (portable_kernel.HOPPER_CONFIGS, portable_kernel.OTHER_CONFIGS) for _, config in table}
    failures = 0
    for config in sorted(configs, key=lambda c: c.name):
        out = torch.full((30, 200), float("nan"), dtype=torch.bfloat16, device="cuda")
        out_masked = torch.full((3, 7, 200), float("nan"), dtype=torch.bfloat16, device="cuda")
        portable_kernel.launch(x, packed.data, 200, 160, offsets, False, out, config)
        portable_kernel.launch(xm, packed.data, 200, 160, masked, True, out_masked, config)
        torch.cuda.synchronize()
        rows = torch.cat([out_masked[0, :7], out_masked[2, :3]]).double()
        want = torch.cat([ref_masked[0, :7], ref_masked[2, :3]])
        error = max(((out.double() - ref).norm() / ref.norm()).item(), ((rows - want).norm() / want.norm()).item())
        ok = error <= 1e-2
        failures += not ok
        print(f"portable {config.name}: relative error {error:.2e} {'ok' if ok else 'FAIL'}")
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
