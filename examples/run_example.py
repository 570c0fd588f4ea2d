"""End-to-end example: quantize bf16 expert weights to MXFP4, pack once, run the grouped GEMM.

Runs on whatever device is there (the SM90 kernel on an H100, the portable path elsewhere), prints
which path and config the call takes and why, and the error against a float64 reference.

    python examples/run_example.py [--experts 8] [--n 512] [--k 1024] [--tokens 96]
"""

from __future__ import annotations

import argparse

import torch

import mxfp4
from mxfp4.format.reference import reference_grouped_mm_float64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--n", type=int, default=512, help="output features (weight rows)")
    parser.add_argument("--k", type=int, default=1024, help="input features, a multiple of 32")
    parser.add_argument("--tokens", type=int, default=96, help="rows of x, routed at random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)

    # 1. Weights: bf16 [E, N, K] -> MXFP4 (OCP MX v1.0) -> the packed Hopper layout, once.
    weights = (torch.randn(args.experts, args.n, args.k) * 0.02).to(torch.bfloat16)
    quantized = mxfp4.quantize(weights.to(device))
    packed = mxfp4.pack(quantized)

    # 2. Tokens grouped by expert: offsets[e]:offsets[e+1] are expert e's rows.
    experts = torch.randint(0, args.experts, (args.tokens,))
    counts = torch.bincount(experts, minlength=args.experts)
    offsets = torch.cat((torch.zeros(1, dtype=torch.int64), counts.cumsum(0))).to(torch.int32).to(device)
    x = torch.randn(args.tokens, args.k, dtype=torch.bfloat16, device=device)

    print(mxfp4.explain(x, packed, offsets))
    out = mxfp4.grouped_mm(x, packed, offsets)

    reference = reference_grouped_mm_float64(x.cpu(), quantized.to("cpu"), offsets.cpu())
    error = float((out.cpu().double() - reference).norm() / reference.norm())
    print(f"rows per expert: {counts.tolist()}")
    print(f"out: {tuple(out.shape)} {out.dtype} on {out.device}")
    print(f"relative error vs float64 reference: {error:.2e} (bar: 1e-2)")
    if not error <= 1e-2:
        raise SystemExit("error above the accuracy bar")


if __name__ == "__main__":
    main()
