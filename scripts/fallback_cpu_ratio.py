"""The fallback's CPU speed against bf16 torch on pre-dequantized weights (issue 9: target <= 2x).

Times the *second and later* calls of ``mxfp4.grouped_mm`` / ``grouped_mm_masked`` on the same
weights (the decoded copy is cached by then) against a bf16 ``torch.mm`` per expert on weights
dequantized beforehand. Runs are interleaved and the median is reported, so other load on the
machine hits both sides alike. Usage::

    python scripts/fallback_cpu_ratio.py [--experts 8] [--n 1024] [--k 1024] [--rows 32] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

import mxfp4  # noqa: E402


def _median_ms(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    times: list[list[float]] = [[] for _ in functions]
    for function in functions:  # warm-up: the first mxfp4 call decodes and fills the cache
        function()
    for _ in range(repeats):
        for i, function in enumerate(functions):
            start = time.perf_counter()
            function()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=32, help="rows per expert")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    e, n, k, m = args.experts, args.n, args.k, args.rows
    torch.manual_seed(0)
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(e, n, k) * 0.05))
    weights = mxfp4.dequantize(mxfp4.unpack(packed), torch.bfloat16)  # the bf16 workaround's weights
    x = torch.randn(e * m, k).bfloat16()
    offsets = torch.arange(e + 1, dtype=torch.int32) * m
    xm, masked_m = x.view(e, m, k), torch.full((e,), m, dtype=torch.int32)

    def bf16_per_expert() -> torch.Tensor:
        out = torch.empty((e * m, n), dtype=torch.bfloat16)
        for i in range(e):
            out[i * m:(i + 1) * m] = torch.mm(x[i * m:(i + 1) * m], weights[i].t())
        return out

    ours, ours_masked, base = _median_ms(
        [lambda: mxfp4.grouped_mm(x, packed, offsets), lambda: mxfp4.grouped_mm_masked(xm, packed, masked_m),
         bf16_per_expert], args.repeats)
    print(f"shape: E={e} N={n} K={k}, {m} rows per expert; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"bf16 per-expert matmul (pre-dequantized): {base:8.2f} ms")
    print(f"mxfp4.grouped_mm, cached (2nd+ call):     {ours:8.2f} ms   ratio {ours / base:.2f}x")
    print(f"mxfp4.grouped_mm_masked, cached:          {ours_masked:8.2f} ms   ratio {ours_masked / base:.2f}x")
    mxfp4.set_fallback_memory_budget(0)  # for contrast: no cache, the weight is decoded on every call
    (per_call,) = _median_ms([lambda: mxfp4.grouped_mm(x, packed, offsets)], max(3, args.repeats // 5))
    print(f"mxfp4.grouped_mm, budget 0 (per-call):    {per_call:8.2f} ms   ratio {per_call / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
