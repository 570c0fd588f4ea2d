"""The forced fallback on a GPU against bf16 ``torch._grouped_mm`` on pre-dequantized weights (issue 9).

On the gpt-oss MoE shapes (E=32 / 128 experts, gate_up N=5760, down N=2880, K=2880), M rows per
expert (uniform), times per call on the device (the host enqueues a batch of calls behind a
``torch.cuda._sleep``, so host overhead is not counted; CUDA events around the batch):

* ``torch bf16``: ``torch._grouped_mm(x, W_bf16^T, offs)`` on weights dequantized beforehand;
* ``fallback``: ``mxfp4.fallback.portable_grouped_mm(x, w.data, n, k, offsets)`` returning its own
  output (what ``ops.py`` runs once it takes the returned tensor instead of copying into its own);
* ``op``: ``mxfp4.grouped_mm`` with the portable path forced (as ``ops.py`` is today);
* ``masked op`` vs ``torch bf16 masked`` (``torch.bmm`` on ``[E, M, K]``).

Usage (on the H100)::

    python scripts/fallback_gpu_ratio.py [--m 1,16,256,4096] [--model gpt-oss-20b]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

import mxfp4  # noqa: E402
from mxfp4 import dispatch  # noqa: E402
from mxfp4.fallback import portable_grouped_mm  # noqa: E402

MODELS = {"gpt-oss-20b": 32, "gpt-oss-120b": 128}
PROJECTIONS = {"gate_up": (5760, 2880), "down": (2880, 2880)}


def device_us(function: Callable[[], object], calls: int = 10, rounds: int = 5) -> float:
    """Median device time per call (µs) of ``calls`` back-to-back calls, host work hidden behind a sleep."""
    function()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)  # ~tens of ms: the host enqueues the whole batch first
        start.record()
        for _ in range(calls):
            function()
        stop.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(stop) * 1e3 / calls)
    return statistics.median(samples)


def run_case(num_experts: int, n: int, k: int, m: int) -> dict[str, float]:
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(num_experts, n, k, device="cuda") * 0.05))
    w_bf16 = mxfp4.dequantize(mxfp4.unpack(packed), torch.bfloat16)
    x = torch.randn(num_experts * m, k, device="cuda").bfloat16()
    offsets = torch.arange(num_experts + 1, dtype=torch.int32, device="cuda") * m
    ends = offsets[1:]
    xm, masked_m = x.view(num_experts, m, k), torch.full((num_experts,), m, dtype=torch.int32, device="cuda")
    ours = portable_grouped_mm(x, packed.data, n, k, offsets)
    base = torch._grouped_mm(x, w_bf16.transpose(1, 2), offs=ends)
    ours, base = ours[:8192].float(), base[:8192].float()  # a few experts' rows: enough to catch a wrong path
    assert float((ours - base).norm() / base.norm().clamp_min(1e-30)) <= 1e-2, "fallback disagrees with torch bf16"
    del ours, base
    times = {
        "torch bf16": device_us(lambda: torch._grouped_mm(x, w_bf16.transpose(1, 2), offs=ends)),
        "fallback": device_us(lambda: portable_grouped_mm(x, packed.data, n, k, offsets)),
        "op": device_us(lambda: mxfp4.grouped_mm(x, packed, offsets)),
        "torch bf16 masked": device_us(lambda: torch.bmm(xm, w_bf16.transpose(1, 2))),
        "masked op": device_us(lambda: mxfp4.grouped_mm_masked(xm, packed, masked_m)),
    }
    del packed, w_bf16
    mxfp4.weight_cache.clear()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16,256,4096", help="rows per expert, comma-separated")
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="default: both")
    args = parser.parse_args(argv)
    dispatch.force_portable(True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device µs per call; ratio = torch / ours (>= 1: as fast)")
    print(f"{'shape':24} {'M':>5} {'torch':>9} {'fallback':>9} {'ratio':>6} {'op':>9} {'ratio':>6}"
          f" {'torch m.':>9} {'masked':>9} {'ratio':>6}")
    for model in args.model or sorted(MODELS):
        for projection, (n, k) in PROJECTIONS.items():
            for m in (int(v) for v in args.m.split(",")):
                t = run_case(MODELS[model], n, k, m)
                base, masked_base = t["torch bf16"], t["torch bf16 masked"]
                print(f"{model + ' ' + projection:24} {m:5d} {base:9.1f} {t['fallback']:9.1f} {base / t['fallback']:6.2f}"
                      f" {t['op']:9.1f} {base / t['op']:6.2f} {masked_base:9.1f} {t['masked op']:9.1f}"
                      f" {masked_base / t['masked op']:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
