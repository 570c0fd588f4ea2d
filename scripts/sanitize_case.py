"""One small grouped GEMM per config the op can pick (defaults + shipped tuning tables), for
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
from codegen.selection import configs_in_use


def main(names: list[str]) -> int:
    configs = [TileConfig.from_name(n) for n in names] if names else configs_in_use()
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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
