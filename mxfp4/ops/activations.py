"""FP8 activations for the W4A8 path: ``mxfp4.quantize_activations`` (the torch op ``mxfp4::quantize_activations``).

Each row of x (a token) gets one float32 scale and e4m3 values::

    amax     = max |x[r, :]|                               (exact: bf16 values in float32)
    scale[r] = amax / 448      (float32, rounded once; 1.0 for an all-zero row)
    x_fp8    = e4m3(clamp(x / scale[r], -448, 448))        (x / scale rounded once in float32, then to
                                                            e4m3, nearest even)

so that ``x ~= x_fp8 * scale`` (448 is e4m3's largest finite value: each row's largest magnitude lands on
it). The SM90 path runs one NVRTC-compiled kernel (templates/mxfp4_quantize_fp8.cuh: one warp per row,
read once into registers up to K = 3072, in two passes beyond); every other device runs the same arithmetic as a torch
composition (:func:`quantize_activations_reference`, one fused kernel under ``torch.compile``). Both
round at the same points, so they agree bit for bit. x must be finite (an Inf or NaN makes its row NaN;
nothing checks, since a check would read the device).
"""

from __future__ import annotations

import math

import torch

from .dispatch import SM90, select_path
from .grouped_gemm import inference_only_backward, runs_directly

FP8_MAX = 448.0  # e4m3's largest finite magnitude


def _check_x(x: object) -> torch.Tensor:
    op = "quantize_activations"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"{op}: x must be bfloat16, got {x.dtype}")
    if x.dim() not in (2, 3) or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [T, K] or [E, max_m, K] with K > 0, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous; pass x.contiguous()")
    return x


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantizer as torch ops (any device): (e4m3 ``x.shape``, float32 ``x.shape[:-1]``)."""
    values = x.float()
    amax = values.abs().amax(dim=-1)
    # amax / 448 as a true division: torch divides a CUDA tensor by a Python number as a multiply by its
    # reciprocal, which rounds differently from the kernel's division in some rows.
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    quantized = (values / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def _quantize_impl(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_x(x)
    if x.numel() == 0 or select_path(x.device).path != SM90:
        return quantize_activations_reference(x)
    from codegen.runtime.quantize import (
        quantize_fp8_sm90,  # lazy: CPU machines never import cuda-python
    )

    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    quantize_fp8_sm90(x, out, scale)
    return out, scale


_quantize_op = torch.library.custom_op("mxfp4::quantize_activations", mutates_args=())(_quantize_impl)


@_quantize_op.register_fake
def _quantize_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_x(x)
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:-1], dtype=torch.float32)


_quantize_op.register_autograd(inference_only_backward("quantize_activations"))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x bf16 ``[T, K]`` (or ``[E, max_m, K]``) -> (x_fp8 float8_e4m3fn, same shape; x_scale float32 ``[T]``
    (``[E, max_m]``)), one scale per row, ``x ~= x_fp8 * x_scale[..., None]`` (see the module docstring).

    Feed the pair to ``mxfp4.grouped_mm(x_fp8, w, offsets, x_scale=x_scale)`` (or the masked variant).
    One kernel on SM90; no host sync; ``torch.compile(fullgraph=True)`` and CUDA graphs see one op.
    """
    _check_x(x)
    if runs_directly(x):
        return _quantize_impl(x)
    return torch.ops.mxfp4.quantize_activations(x)


def quantize_gathered_rows(x: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activations(x)`` gathered to the rows ``token`` (the MoE layer's routed rows: each token's row once
    per choice): (e4m3 ``[len(token), K]``, float32 ``[len(token)]``). On SM90, in an eager call, one launch (the
    quantizer reads row token[r] of x for output row r); elsewhere quantize, then gather. A row's scale depends on
    that row alone, so both give the same bits. x: validated bf16 ``[T, K]``; token: integer, values in [0, T)."""
    if token.numel() and select_path(x.device).path == SM90 and runs_directly(x):
        from codegen.runtime.quantize import quantize_fp8_sm90  # lazy: CPU machines never import cuda-python

        x = x.contiguous()
        out = torch.empty((token.numel(), x.shape[-1]), dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty(token.numel(), dtype=torch.float32, device=x.device)
        quantize_fp8_sm90(x, out, scale, source_rows=token.to(torch.int32).contiguous())
        return out, scale
    x_fp8, x_scale = quantize_activations(x)
    return x_fp8.view(torch.uint8).index_select(0, token).view(torch.float8_e4m3fn), x_scale.index_select(0, token)


# The largest |u * sigmoid(u)| for u < 0 (0.278464... at u = -1.27846), rounded up: gpt-oss's glu = gate *
# sigmoid(alpha * gate) is never below -SILU_MIN_MAGNITUDE / alpha.
SILU_MIN_MAGNITUDE = 0.27847


def swiglu_e4m3_scale(alpha: float, limit: float) -> float | None:
    """The static e4m3 scale of gpt-oss's clamped SwiGLU, ``(clamp(up, -limit, limit) + 1) * glu`` with
    ``glu = g * sigmoid(alpha * g)``, ``g = min(gate, limit)``: the smallest power of two s with |SwiGLU| / s <= 448
    for every input, since |up + 1| <= limit + 1 and glu, increasing for g > 0, lies in [-SILU_MIN_MAGNITUDE / alpha,
    limit * sigmoid(alpha * limit)] (both ends reached). gpt-oss's (1.702, 7.0) bound it by 55.9996: s = 1/8.

    The FP8 layer's gate_up kernel writes the activated rows as ``e4m3(value / s)`` with this s for every row, so no
    quantizer launch runs between the two GEMMs (a per-row scale would need each row's amax across every n-tile of
    gate_up). e4m3 keeps its 2^-4 relative step from 2^-6 * s up, so only values below 0.002 (gpt-oss) lose
    precision against a per-row scale. None when nothing bounds SwiGLU (alpha <= 0: glu follows a negative gate
    down; or a limit that is negative or not finite, which mxfp4.moe refuses): the layer quantizes per row then."""
    if not (alpha > 0 and 0 <= limit < math.inf):
        return None
    bound = (limit + 1) * max(limit / (1 + math.exp(-alpha * limit)), SILU_MIN_MAGNITUDE / alpha)
    return math.ldexp(1.0, math.ceil(math.log2(bound / FP8_MAX)))
