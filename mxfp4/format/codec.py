"""Quantize to and dequantize from MXFP4 (OCP Microscaling Formats v1.0, E2M1 values, E8M0 scales).

Quantization of one block of 32 values along the last dim:

* shared exponent ``X = floor(log2(amax)) - 2`` (2 is E2M1's largest exponent), clamped to E8M0's
  range ``[-127, 127]``; the scale byte is ``X + 127``. ``floor(log2)`` comes from ``torch.frexp``,
  which is exact (no float log2 that could round up near a power of two);
* an all-zero block has no exponent (log2(0) = -inf) and takes the clamp: scale byte 0, codes 0;
* each ``v / 2**X`` is rounded to nearest, ties to even, on the E2M1 grid
  {0, 0.5, 1, 1.5, 2, 3, 4, 6} and saturated to +-6;
* values that round to zero get code 0 (+0, never -0), so zero blocks are byte-identical whatever
  the signs of their zeros (ggml's quantizer does the same);
* NaN or Inf input raises ``ValueError`` naming the index of the first bad element.

Dequantization is exact: ``E2M1 value * 2**(s - 127)`` computed in float32 (float64 when asked for),
whose product of a 2-significant-bit value and a power of two is exact down to the subnormals;
scale byte 0xFF decodes to NaN. Values beyond the output dtype's range become +-Inf (only scale
bytes >= 254 with |value| >= 2 in float32 / bfloat16).
"""

from __future__ import annotations

import torch

from .tensor import BLOCK_SIZE, E2M1_VALUES, MXFP4Tensor

E8M0_BIAS = 127
E8M0_NAN = 0xFF
E2M1_EMAX = 2  # 6 = 1.5 * 2**2
_MAX_SCALE_EXP = 127  # byte 254
_MIN_SCALE_EXP = -127  # byte 0

# Bound on the values handled at once, so that temporaries stay a few hundred MB at most.
_CHUNK_VALUES = 1 << 24

# Midpoints between consecutive E2M1 magnitudes and whether a tie there goes up (to the even code).
# code = number of midpoints passed; even codes (0, 1.0, 2.0, 4.0) keep ties, odd ones give them up.
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def _pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact ``2**exponent`` for normal-range integer exponents, built from the exponent bits."""
    if dtype == torch.float64:
        return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def _unravel(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(index))


def e2m1_magnitude_codes(magnitude: torch.Tensor) -> torch.Tensor:
    """Magnitudes (>= 0, float) rounded to nearest, ties to even, on the E2M1 grid, saturated at 6:
    uint8 codes 0..7 (the sign bit is the caller's)."""
    magnitude = magnitude.clamp(max=6.0)
    code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=magnitude.device)
    for midpoint, tie_goes_up in _MIDPOINTS:
        code += (magnitude >= midpoint) if tie_goes_up else (magnitude > midpoint)
    return code


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: float [R, K/32, 32] (float32 or float64, all finite) -> (codes uint8 [R, K], scales uint8 [R, K/32])."""
    amax = rows.abs().amax(dim=-1)
    _, frexp_exp = torch.frexp(amax)  # amax = m * 2**e with m in [0.5, 1): floor(log2(amax)) = e - 1
    shared = (frexp_exp.to(torch.int32) - 1 - E2M1_EMAX).clamp(_MIN_SCALE_EXP, _MAX_SCALE_EXP)
    shared = torch.where(amax == 0, torch.full_like(shared, _MIN_SCALE_EXP), shared)
    # X <= 125 for any finite float32 (and 127 suffices for float64 values of bf16 range), so
    # 2**-X is a normal number and the product below is exact wherever it matters (>= 2**-126).
    scaled = rows * _pow2(-shared, rows.dtype).unsqueeze(-1)
    code = e2m1_magnitude_codes(scaled.abs())
    code |= ((scaled < 0) & (code != 0)).to(torch.uint8) << 3
    scales = (shared + E8M0_BIAS).to(torch.uint8)
    return code.reshape(rows.shape[0], -1), scales


def quantize(w: torch.Tensor) -> MXFP4Tensor:
    """Quantize a float tensor ``[..., K]`` to MXFP4 along its last dim (K a multiple of 32).

    Runs on ``w``'s device (CPU or CUDA), a bounded number of rows at a time. A ``meta`` tensor (no values, as
    when a model is built before its weights load) gives an MXFP4Tensor on ``meta`` of the right shapes, as
    any torch op does there; only the finiteness check, which needs values, is left out.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize: w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"quantize: w must be a floating-point tensor, got {w.dtype}")
    if w.dim() == 0 or w.shape[-1] == 0 or w.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"quantize: the last dim of w (K) must be a positive multiple of {BLOCK_SIZE}, got shape {tuple(w.shape)}"
        )
    shape = w.shape
    k = shape[-1]
    # float32 holds bf16/fp16 exactly; float64 input stays float64 so no rounding precedes ours.
    work_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    flat = w.reshape(-1, k)
    num_rows = flat.shape[0]
    codes = torch.empty((num_rows, k), dtype=torch.uint8, device=w.device)
    scales = torch.empty((num_rows, k // BLOCK_SIZE), dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK_VALUES // max(k, 1))
    for r0 in range(0, num_rows, step):
        chunk = flat[r0 : r0 + step].to(work_dtype)
        _check_finite(chunk, flat, r0, shape)
        codes[r0 : r0 + step], scales[r0 : r0 + step] = _quantize_rows(chunk.view(chunk.shape[0], -1, BLOCK_SIZE))
    codes = codes.reshape(shape)
    scales = scales.reshape(*shape[:-1], k // BLOCK_SIZE)
    return MXFP4Tensor.from_codes(codes, scales)


def _check_finite(chunk: torch.Tensor, flat: torch.Tensor, r0: int, shape: torch.Size) -> None:
    """ValueError naming the first NaN/Inf of ``chunk`` (rows ``r0..`` of ``flat``); a meta chunk has no values."""
    if chunk.is_meta:
        return
    k = shape[-1]
    finite = torch.isfinite(chunk)
    if not bool(finite.all()):
        first = int((~finite).reshape(-1).nonzero()[0, 0]) + r0 * k
        bad = float(flat.reshape(-1)[first])
        raise ValueError(f"quantize: w must be finite; element {_unravel(first, shape)} is {bad}")


def _scale_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """2**(s - 127) for every byte s, exact (s = 0 is a subnormal in float32), 0xFF -> NaN."""
    exps = torch.arange(256, dtype=torch.int32, device=device) - E8M0_BIAS
    if dtype == torch.float64:
        table = _pow2(exps, torch.float64)
    else:
        # 2**-127 is below float32's normal range: its bits are the subnormal 0x00400000.
        bits = torch.arange(256, dtype=torch.int32, device=device) << 23
        bits[0] = 0x00400000
        table = bits.view(torch.float32).clone()
    table[E8M0_NAN] = float("nan")
    return table


def dequantize(t: MXFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The values of an MXFP4 tensor as ``dtype`` (exact wherever ``dtype`` can hold them)."""
    if not isinstance(t, MXFP4Tensor):
        raise TypeError(f"dequantize: t must be an MXFP4Tensor, got {type(t).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dequantize: dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    device = t.device
    values = torch.tensor(E2M1_VALUES, dtype=work_dtype, device=device)
    scale_table = _scale_table(work_dtype, device)
    out = torch.empty(t.shape, dtype=dtype, device=device)
    blocks = t.blocks.reshape(-1, *t.blocks.shape[-2:])
    scales = t.scales.reshape(-1, t.scales.shape[-1])
    flat_out = out.view(-1, t.shape[-1]) if out.numel() else out.reshape(-1, t.shape[-1])
    step = max(1, _CHUNK_VALUES // max(t.shape[-1], 1))
    for r0 in range(0, blocks.shape[0], step):
        chunk = MXFP4Tensor(blocks[r0 : r0 + step], scales[r0 : r0 + step])
        decoded = values[chunk.codes().long()].view(*chunk.scales.shape, BLOCK_SIZE)
        decoded = decoded * scale_table[chunk.scales.long()].unsqueeze(-1)
        flat_out[r0 : r0 + step] = decoded.reshape(chunk.scales.shape[0], -1).to(dtype)
    return out
