"""The portable path (any device: decode in torch + bf16 matmul) and float64 references for tests.

Both read the packed layout through ``layout.unpack_experts``, a few experts at a time, so memory
stays bounded and the portable path checks the same bytes the SM90 kernel reads.
"""

from __future__ import annotations

import torch

from .layout import PackedMXFP4, unpack_experts
from .format import dequantize
from .tensor import MXFP4Tensor

# Bound on the weight values decoded at once (bf16: 2 bytes each, plus decode temporaries).
_DECODE_VALUES = 1 << 25


def _experts_per_chunk(n: int, k: int) -> int:
    return max(1, _DECODE_VALUES // max(1, n * k))


def _matmul_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T: bf16 in, fp32 accumulation, bf16 out (CPU bf16 gemm is slow: use fp32)."""
    if x.device.type == "cuda":
        return torch.mm(x, w.t())
    return torch.mm(x.float(), w.float().t()).to(torch.bfloat16)


def portable_grouped_mm(
    x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, offsets: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Contiguous variant into ``out`` [T, N]. Reads ``offsets`` on the host (a sync on CUDA)."""
    packed = PackedMXFP4(w_data, n, k)
    bounds = offsets.tolist()
    step = _experts_per_chunk(n, k)
    for e0 in range(0, packed.num_experts, step):
        e1 = min(packed.num_experts, e0 + step)
        if all(bounds[e] == bounds[e + 1] for e in range(e0, e1)):
            continue  # no rows for these experts: skip the decode
        weights = dequantize(unpack_experts(packed, e0, e1), torch.bfloat16)
        for e in range(e0, e1):
            start, stop = bounds[e], bounds[e + 1]
            if stop > start:
                out[start:stop] = _matmul_bf16(x[start:stop], weights[e - e0])
    return out


def portable_grouped_mm_masked(
    x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, masked_m: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Masked variant into ``out`` [E, max_m, N]: every row is computed (no host read of masked_m)."""
    packed = PackedMXFP4(w_data, n, k)
    step = _experts_per_chunk(n, k)
    for e0 in range(0, packed.num_experts, step):
        e1 = min(packed.num_experts, e0 + step)
        weights = dequantize(unpack_experts(packed, e0, e1), torch.bfloat16)
        for e in range(e0, e1):
            out[e] = _matmul_bf16(x[e], weights[e - e0])
    return out


def _weights_float64(w: MXFP4Tensor | PackedMXFP4) -> torch.Tensor:
    if isinstance(w, PackedMXFP4):
        w = unpack_experts(w, 0, w.num_experts)
    return dequantize(w, torch.float64)


def reference_grouped_mm_float64(
    x: torch.Tensor, w: MXFP4Tensor | PackedMXFP4, offsets: torch.Tensor
) -> torch.Tensor:
    """float64 ``out[rows of e] = x[rows of e] @ W_e^T`` on the dequantized weights (test sizes only)."""
    weights = _weights_float64(w).to(x.device)
    bounds = offsets.tolist()
    out = torch.zeros((x.shape[0], weights.shape[1]), dtype=torch.float64, device=x.device)
    for e in range(weights.shape[0]):
        start, stop = bounds[e], bounds[e + 1]
        out[start:stop] = x[start:stop].double() @ weights[e].t()
    return out


def reference_grouped_mm_masked_float64(x: torch.Tensor, w: MXFP4Tensor | PackedMXFP4) -> torch.Tensor:
    """float64 ``out[e] = x[e] @ W_e^T`` for every row (compare rows below masked_m only)."""
    weights = _weights_float64(w).to(x.device)
    return torch.einsum("emk,enk->emn", x.double(), weights)
