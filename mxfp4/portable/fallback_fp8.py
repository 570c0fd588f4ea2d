"""The portable path of FP8 activations (x float8_e4m3fn with one float32 scale per row): the W4A8 kernel's
math, on any device, with torch ops.

The kernel computes, for weight row n of expert e and row m of x::

    acc = sum over k of x_fp8[m, k] * w[n, k]      (float32 accumulation of exact products)
    out = bf16(acc * (x_scale[m] * w_scale[e, n]))   (one rounding)

where ``w`` is the weight as the kernel multiplies it: the MXFP4 value for ``mxfp4.pack`` weights
(``w_scale`` = 1: the W4A16 kernel on x widened to bf16, x_scale in its epilogue), or the e4m3 value of the
FP8-ready layout (``mxfp4.pack(w, activations="fp8")``; ``w_scale`` its ``row_scale``). Here the same: the
decoded weights (kept in :mod:`mxfp4.portable.weight_cache` like the bf16 portable path's, else decoded a few experts
at a time) hold ``w`` exactly in bf16, x_fp8 and w widen exactly to float32 (e4m3 and E2M1 values have at
most 4 significant bits, so even TF32 holds them), the matmul accumulates in float32, and the factor is
applied and rounded once. Only the order of the sums differs from the kernel's.

The contiguous variant reads ``offsets`` on the host (a device sync on a GPU: this path is for correctness
where the W4A8 kernel cannot run); the masked variant computes every row and reads nothing back.
"""

from __future__ import annotations

from typing import Iterator

import torch

from mxfp4.format.layout_fp8 import PackedMXFP4FP8, decode_fp8_values

from . import weight_cache
from .fallback import decode_weight, per_call_reason

_DECODE_VALUES = 1 << 25  # bound on the weight values decoded at once on the per-call path


def decode_fp8_weight(w_data: torch.Tensor, w_scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The FP8-ready weight's e4m3 values as bf16 ``[E, N, K]`` (without its row scales)."""
    packed = PackedMXFP4FP8(w_data, w_scale, n, k)
    return decode_fp8_values(packed, 0, packed.num_experts)


def _decode(w_data: torch.Tensor, w_scale: torch.Tensor | None, n: int, k: int, start: int, stop: int) -> torch.Tensor:
    if w_scale is None:
        return decode_weight(w_data[start:stop], n, k)
    return decode_fp8_values(PackedMXFP4FP8(w_data, w_scale, n, k), start, stop)


def _weight_chunks(w_data: torch.Tensor, w_scale: torch.Tensor | None, n: int,
                   k: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first expert, its decoded weights ``[e, N, K]`` bf16): the cached whole weight, or bounded chunks."""
    capturing = w_data.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing and per_call_reason(w_data, n, k) is None:
        decoded = weight_cache.get_or_decode(w_data, n, k, lambda: _decode(w_data, w_scale, n, k, 0, w_data.shape[0]))
        if decoded is not None:  # None only if the budget changed meanwhile
            yield 0, decoded
            return
    step = max(1, _DECODE_VALUES // max(1, n * k))
    for e0 in range(0, w_data.shape[0], step):
        yield e0, _decode(w_data, w_scale, n, k, e0, min(w_data.shape[0], e0 + step))


def _factor(x_scale: torch.Tensor, w_scale: torch.Tensor | None, expert: int, n: int) -> torch.Tensor:
    """x_scale[m] * w_scale[e, n] as ``[rows, 1]`` or ``[rows, N]`` (float32)."""
    factor = x_scale.unsqueeze(-1)
    return factor if w_scale is None else factor * w_scale[expert, :n]


def _scaled_product(x: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """bf16(float32(x @ weight^T) * factor): x float8 ``[M, K]``, weight bf16 ``[N, K]`` holding exact values."""
    return (x.float() @ weight.float().t()).mul_(factor).to(torch.bfloat16)


def portable_grouped_mm_fp8(x: torch.Tensor, x_scale: torch.Tensor, w_data: torch.Tensor, n: int, k: int,
                            offsets: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
    """Contiguous variant: bf16 ``[T, N]`` (inputs validated by the op)."""
    out = torch.empty((x.shape[0], n), dtype=torch.bfloat16, device=x.device)
    bounds = offsets.tolist()
    for first, weights in _weight_chunks(w_data, w_scale, n, k):
        for e in range(first, first + weights.shape[0]):
            rows = slice(bounds[e], bounds[e + 1])
            if bounds[e + 1] > bounds[e]:
                out[rows] = _scaled_product(x[rows], weights[e - first], _factor(x_scale[rows], w_scale, e, n))
    return out


def portable_grouped_mm_masked_fp8(x: torch.Tensor, x_scale: torch.Tensor, w_data: torch.Tensor, n: int, k: int,
                                   w_scale: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Masked variant into ``out`` ``[E, max_m, N]``: every row (no host read of masked_m)."""
    for first, weights in _weight_chunks(w_data, w_scale, n, k):
        for e in range(first, first + weights.shape[0]):
            out[e] = _scaled_product(x[e], weights[e - first], _factor(x_scale[e], w_scale, e, n))
    return out
