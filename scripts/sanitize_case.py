"""One small grouped GEMM per config the op can pick (defaults + shipped tuning tables) and per kernel
family (codegen.selection.FAMILY_SAMPLES), and the
fused MoE layer (SwiGLU and scatter epilogues; also with foreign expert ids, as expert parallelism passes
them), for compute-sanitizer (memcheck, racecheck) on the device.

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
    return 1 if failures + moe_case(False) + moe_case(True) else 0


def moe_case(foreign: bool) -> int:
    """The fused layer on a small problem with tails (H, I not multiples of 64), an empty expert, biases;
    ``foreign``: a third of the choices carry ids outside [0, E) (the sentinel E, -1), skipped."""
    from mxfp4.moe_layer import reference_moe_float64

    generator = torch.Generator().manual_seed(1)
    experts, hidden, inter, tokens, top_k = 4, 160, 96, 13, 2
    gate_up = mxfp4.pack_gate_up(mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.1)).to("cuda")
    down = mxfp4.pack(mxfp4.quantize(torch.randn(experts, hidden, inter, generator=generator) * 0.1)).to("cuda")
    biases = [torch.randn(experts, size, generator=generator).to("cuda", torch.bfloat16) for size in (2 * inter, hidden)]
    x = torch.randn(tokens, hidden, generator=generator).to("cuda", torch.bfloat16)
    ids = torch.randint(0, experts - 1, (tokens, top_k), generator=generator).to("cuda")  # expert 3: empty
    weights = torch.rand(tokens, top_k, generator=generator).to("cuda")
    if foreign:  # a sixth of the choices each: the sentinel E, and -1
        picks = torch.randint(0, 6, ids.shape, generator=generator).to("cuda")
        ids = ids.masked_fill(picks == 0, experts).masked_fill(picks == 1, -1)
    out = mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=biases[0], down_bias=biases[1], skip_invalid_ids=foreign)
    ref = reference_moe_float64(x, ids, weights, gate_up, down, *biases, skip_invalid_ids=foreign)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    label = "foreign ids skipped" if foreign else "fused epilogues"
    print(f"moe ({label}): relative error {error:.2e} {'ok' if error <= 1e-2 else 'FAIL'}")
    return int(not error <= 1e-2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
