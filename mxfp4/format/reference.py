"""float64 references of the grouped GEMM, for tests and checks (the portable path lives in :mod:`mxfp4.portable`).

The references read the packed layout through ``layout.unpack_experts`` (the bytes the kernels read).
"""

from __future__ import annotations

import torch

from .codec import dequantize
from .layout import PackedMXFP4, unpack_experts
from .tensor import MXFP4Tensor

__all__ = [
    "reference_grouped_mm_float64",
    "reference_grouped_mm_masked_float64",
]


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
