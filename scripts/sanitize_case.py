"""One small grouped GEMM per config the op can pick (defaults + shipped tuning tables) and per kernel
family (codegen.selection.FAMILY_SAMPLES), the fused MoE layer (SwiGLU and scatter epilogues), and the
portable in-register kernel (forced: every tile config of its table, both variants), for
compute-sanitizer (memcheck, racecheck) on the device.

Usage: compute-sanitizer --tool memcheck python scripts/sanitize_case.py [CONFIG ...]
Exits non-zero if a result is off (the sanitizer's own report is what the device script reads).
"""

from __future__ import annotations

import sys

import torch

import mxfp4
from codegen import TileConfig
from codegen.launch import grouped_mm_sm90
from codegen.selection import configs_under_test


def main(names: list[str]) -> int:
    configs = [TileConfig.from_name(n) for n in names] if names else configs_under_test()
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    num_experts, n, k = 3, 200, 160  # N and K tails, an empty expert
    blocks = torch.randint(0, 256, (num_experts, n, k // 32, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(120, 130, (num_experts, n, k // 32), generator=generator, dtype=torch.uint8)
    weight = mxfp4.MXFP4Tensor(blocks, scales).to(device)
    packed = mxfp4.pack(weight)
    counts = [9, 0, 21]
    offsets = torch.tensor([0, 9, 9, 30], dtype=torch.int32, device=device)
    x = torch.randn(sum(counts), k, generator=generator).to(device, torch.bfloat16)
    w = mxfp4.dequantize(weight, torch.float32)
    ref = torch.cat([x[0:9].float() @ w[0].T, x[9:30].float() @ w[2].T])
    failures = 0
    for config in configs:
        out = torch.full((x.shape[0], n), float("nan"), dtype=torch.bfloat16, device=device)
        grouped_mm_sm90(x, packed.data, n, k, offsets, False, config, out)
        torch.cuda.synchronize()
        error = ((out.float() - ref).norm() / ref.norm()).item()
        ok = error <= 1e-2
        failures += not ok
        print(f"{config.name}: relative error {error:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if failures + moe_case() + portable_case() else 0


def moe_case() -> int:
    """The fused layer on a small problem with tails (H, I not multiples of 64), an empty expert, biases."""
    from mxfp4.moe_layer import reference_moe_float64

    generator = torch.Generator().manual_seed(1)
    experts, hidden, inter, tokens, top_k = 4, 160, 96, 13, 2
    gate_up = mxfp4.pack_gate_up(mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.1)).to("cuda")
    down = mxfp4.pack(mxfp4.quantize(torch.randn(experts, hidden, inter, generator=generator) * 0.1)).to("cuda")
    biases = [torch.randn(experts, size, generator=generator).to("cuda", torch.bfloat16) for size in (2 * inter, hidden)]
    x = torch.randn(tokens, hidden, generator=generator).to("cuda", torch.bfloat16)
    ids = torch.randint(0, experts - 1, (tokens, top_k), generator=generator).to("cuda")  # expert 3: empty
    weights = torch.rand(tokens, top_k, generator=generator).to("cuda")
    out = mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1])
    ref = reference_moe_float64(x, ids, weights, gate_up, down, *biases)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"moe (fused epilogues): relative error {error:.2e} {'ok' if error <= 1e-2 else 'FAIL'}")
    return int(not error <= 1e-2)


def portable_case() -> int:
    """The Triton kernel of the forced portable path: tails (N = 200, K = 160), an empty expert, every config."""
    from mxfp4 import portable_kernel
    from mxfp4.reference import reference_grouped_mm_float64, reference_grouped_mm_masked_float64

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
