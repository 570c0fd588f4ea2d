"""The portable path (any device that is not an SM90 GPU with a working toolchain).

Three modes, chosen per call (:func:`choose_mode`):

* **in-register kernel** (CUDA GPUs from SM80 on with Triton: the default there): the Triton kernel of
  :mod:`mxfp4.portable.kernel` reads the packed bytes and decodes them in registers. No decoded copy, no host
  read of ``offsets`` / ``masked_m``, CUDA-graph capturable.
* **cached**: the weight is decoded to bf16 ``[E, N, K]`` once, kept in the decoded-weight cache
  (:mod:`mxfp4.portable.weight_cache`, under a memory budget), and every call is ``torch._grouped_mm`` (contiguous
  variant) or ``torch.bmm`` (masked) on it: the same work as bf16 torch on pre-dequantized weights. On the
  CPU this is the usual mode. Where the kernel runs, the budget is 0 by default; a budget above 0 opts
  prefill-sized calls (at least ``CACHE_MIN_ROWS`` rows per expert) into the copy, while smaller calls keep
  the kernel, which reads a quarter of the bytes.
* **per-call decode**: where neither runs (the CPU or a GPU without the kernel, with a copy that cannot be
  cached: over the budget, budget 0, an inference tensor, or during CUDA-graph capture): decode a bounded
  number of experts at a time and multiply per expert. Correct, much slower; the contiguous variant reads
  offsets on the host.

All read the packed layout as ``layout.unpack_experts`` describes it: the same bytes the SM90 kernel reads.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from mxfp4.format.codec import dequantize
from mxfp4.format.layout import PackedMXFP4, unpack_experts

from . import kernel as portable_kernel
from . import weight_cache

# Bound on the weight values decoded at once on the per-call path (bf16: 2 bytes each, plus temporaries).
_DECODE_VALUES = 1 << 25
# Rows per expert from which a call may use the cached bf16 copy where the in-register kernel also runs.
CACHE_MIN_ROWS = 128
KERNEL, CACHED, PER_CALL = "in-register kernel", "cached decoded weights", "per-call decode"
_warned: set[str] = set()
_warn_lock = threading.Lock()


def _experts_per_chunk(n: int, k: int) -> int:
    return max(1, _DECODE_VALUES // max(1, n * k))


def decode_weight(w_data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The whole weight as bf16 ``[E, N, K]``, decoded a bounded number of experts at a time."""
    packed = PackedMXFP4(w_data, n, k)
    out = torch.empty((packed.num_experts, n, k), dtype=torch.bfloat16, device=w_data.device)
    step = _experts_per_chunk(n, k)
    for e0 in range(0, packed.num_experts, step):
        e1 = min(packed.num_experts, e0 + step)
        out[e0:e1] = dequantize(unpack_experts(packed, e0, e1), torch.bfloat16)
    return out


# ---------------------------------------------------------------------------------------------
# Which mode a call takes.


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def per_call_reason(w_data: torch.Tensor, n: int, k: int) -> str | None:
    """Why this call decodes per call instead of using the cache (None: it uses the cache)."""
    if _capturing(w_data.device):
        return ("a CUDA graph is being captured: the graph decodes on every replay, so it sees in-place "
                "weight changes (a cached copy filled during capture would be empty until replay)")
    return weight_cache.uncacheable_reason(w_data, n, k)


def _cached_weights(w_data: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    if _capturing(w_data.device):
        return None
    decoded = weight_cache.get_or_decode(w_data, n, k, lambda: decode_weight(w_data, n, k))
    if decoded is None:
        _warn_per_call(w_data, n, k)
    return decoded


def _warn_per_call(w_data: torch.Tensor, n: int, k: int) -> None:
    """Once per kind of reason: the slow mode is never silent (budget 0 is the user's explicit choice)."""
    reason = per_call_reason(w_data, n, k)
    if reason is None or "budget is 0" in reason:
        return
    kind = reason.split(" (")[0]
    with _warn_lock:
        if kind in _warned:
            return
        _warned.add(kind)
    warnings.warn(f"mxfp4 fallback: decoding the weight on every call (slow): {reason}", RuntimeWarning, stacklevel=4)


@lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, index: int | None) -> bool:
    """Whether ``torch._grouped_mm`` runs bf16 2D x 3D here (missing before torch 2.8, SM90-only in 2.8)."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        x = torch.zeros((2, 16), dtype=torch.bfloat16, device=device)
        w = torch.zeros((2, 8, 16), dtype=torch.bfloat16, device=device)
        torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([1, 2], dtype=torch.int32, device=device))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def grouped_mm_usable(device: torch.device) -> bool:
    return _grouped_mm_works(device.type, device.index)


def _grouped_mm_syncs(device: torch.device) -> bool:
    """torch's CUTLASS grouped GEMM (sm90/sm100) keeps offsets on the device; its loop fallback reads them."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] not in (9, 10)


def choose_mode(w_data: torch.Tensor, n: int, k: int, rows_per_expert: int) -> tuple[str, str]:
    """(mode, why) of a call with about ``rows_per_expert`` rows per expert: KERNEL, CACHED or PER_CALL."""
    device = w_data.device
    if portable_kernel.unavailable_reason(device.type, device.index) is None:
        return _mode_where_the_kernel_runs(w_data, n, k, rows_per_expert)
    why_not = per_call_reason(w_data, n, k)
    if why_not is not None:
        return PER_CALL, why_not
    return CACHED, _cache_reason(device)


def _cache_reason(device: torch.device) -> str:
    budget, source = weight_cache.fallback_memory_budget(device)
    return (f"the decoded copy fits the budget ({weight_cache.format_bytes(budget)}, {source}); the first call "
            "decodes it, later calls reuse it until the weight changes or is freed")


def _mode_where_the_kernel_runs(w_data: torch.Tensor, n: int, k: int, rows_per_expert: int) -> tuple[str, str]:
    if _capturing(w_data.device):
        return KERNEL, ("a CUDA graph is being captured: the graph runs the kernel on the packed bytes, so a replay "
                        "sees in-place weight changes and no copy is held")
    no_copy = weight_cache.uncacheable_reason(w_data, n, k)
    if no_copy is not None:
        return KERNEL, f"no decoded copy is kept: {no_copy}"
    if rows_per_expert < CACHE_MIN_ROWS:
        return KERNEL, (f"about {rows_per_expert} rows per expert, below {CACHE_MIN_ROWS}: the kernel reads a "
                        "quarter of the decoded copy's bytes; the budget lets prefill-sized calls use the copy")
    return CACHED, f"{rows_per_expert} rows per expert (at least {CACHE_MIN_ROWS}) and {_cache_reason(w_data.device)}"


def takes_kernel(w_data: torch.Tensor, n: int, k: int, rows_per_expert: int) -> bool:
    """``choose_mode(...)[0] == KERNEL``, without composing the reasons (a per-call decision)."""
    device = w_data.device
    if portable_kernel.unavailable_reason(device.type, device.index) is not None:
        return False
    return (rows_per_expert < CACHE_MIN_ROWS or _capturing(device)
            or weight_cache.uncacheable_reason(w_data, n, k) is not None)


def kernel_serves(device: torch.device, rows_per_expert: int) -> bool:
    """Whether every call of about ``rows_per_expert`` rows per expert on ``device`` takes the in-register kernel,
    whatever the memory budget and whether or not a CUDA graph is being captured (so a captured call computes
    what an eager one does)."""
    return rows_per_expert < CACHE_MIN_ROWS and portable_kernel.unavailable_reason(device.type, device.index) is None


@dataclass(frozen=True)
class FallbackMode:
    """What the portable path does for one call on one weight (for ``mxfp4.explain``)."""

    mode: str  # KERNEL, CACHED or PER_CALL
    reason: str
    compute: str
    decoded_nbytes: int  # what a decoded bf16 copy of the weight takes (held only in CACHED mode)
    cached_now: bool
    stats: weight_cache.CacheStats


def fallback_mode(w_data: torch.Tensor, n: int, k: int, masked: bool, rows_per_expert: int) -> FallbackMode:
    device = w_data.device
    size = weight_cache.decoded_nbytes(n, k, w_data.shape[0])
    stats = weight_cache.stats(device)
    mode, reason = choose_mode(w_data, n, k, rows_per_expert)
    cached_now = weight_cache.is_cached(w_data, n, k)
    if mode == KERNEL:
        config = portable_kernel.device_config(device, rows_per_expert)
        rows = "masked_m" if masked else "offsets"
        compute = (f"Triton kernel {config.name}: packed bytes decoded in registers, bf16 x, fp32 accumulation; "
                   f"{rows} read on the device (no host sync, CUDA-graph capturable)")
        return FallbackMode(mode, reason, compute, size, cached_now, stats)
    if mode == PER_CALL:
        compute = "decode a few experts at a time, then a bf16 matmul per expert"
        if not masked:
            compute += " (reads offsets on the host: a device sync per call on a GPU)"
        return FallbackMode(mode, reason, compute, size, False, stats)
    return FallbackMode(mode, reason, _cached_compute(device, masked), size, cached_now, stats)


def _cached_compute(device: torch.device, masked: bool) -> str:
    if masked:
        return "torch.bmm on the decoded weights (every row, no host read of masked_m)"
    if not grouped_mm_usable(device):
        return "a bf16 matmul per expert on the decoded weights (torch._grouped_mm unavailable; reads offsets on the host)"
    if device.type == "cpu":
        sync = "a loop over experts inside torch"
    else:
        sync = "reads offsets on the host: torch's loop fallback" if _grouped_mm_syncs(device) else "no host sync"
    return f"torch._grouped_mm on the decoded weights, offsets on {device.type} ({sync})"


# ---------------------------------------------------------------------------------------------
# The two variants.


def _mm_per_expert(x: torch.Tensor, weights: torch.Tensor, bounds: list[int], out: torch.Tensor, first: int) -> None:
    """``out[rows of e] = x[rows of e] @ weights[e - first]^T`` for the experts ``weights`` holds."""
    for i in range(weights.shape[0]):
        start, stop = bounds[first + i], bounds[first + i + 1]
        if stop > start:
            out[start:stop] = _matmul_bf16(x[start:stop], weights[i])


def _matmul_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T: bf16 in, fp32 accumulation, bf16 out."""
    return torch.mm(x, w.t())


def _cached_grouped_mm(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if grouped_mm_usable(x.device) and x.data_ptr() % 16 == 0:
        ends = offsets[1:] if offsets.dtype == torch.int32 else offsets[1:].to(torch.int32)
        result = torch._grouped_mm(x, weights.transpose(1, 2), offs=ends)
        if out is None:
            return result.contiguous()  # a copy only when N is not a multiple of 8 (torch pads the row stride)
        return out.copy_(result)
    if out is None:
        out = torch.empty((x.shape[0], weights.shape[1]), dtype=torch.bfloat16, device=x.device)
    _mm_per_expert(x, weights, offsets.tolist(), out, 0)
    return out


def portable_grouped_mm(
    x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, offsets: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Contiguous variant: ``[T, N]`` into ``out`` if given, else a new tensor (no copy). Returns it."""
    if takes_kernel(w_data, n, k, -(-x.shape[0] // w_data.shape[0])):
        if out is None:
            out = torch.empty((x.shape[0], n), dtype=torch.bfloat16, device=x.device)
        return portable_kernel.launch(x, w_data, n, k, offsets, False, out)
    weights = _cached_weights(w_data, n, k)
    if weights is not None:
        return _cached_grouped_mm(x, weights, offsets, out)
    if out is None:
        out = torch.empty((x.shape[0], n), dtype=torch.bfloat16, device=x.device)
    packed = PackedMXFP4(w_data, n, k)
    bounds = offsets.tolist()
    step = _experts_per_chunk(n, k)
    for e0 in range(0, packed.num_experts, step):
        e1 = min(packed.num_experts, e0 + step)
        if all(bounds[e] == bounds[e + 1] for e in range(e0, e1)):
            continue  # no rows for these experts: skip the decode
        _mm_per_expert(x, dequantize(unpack_experts(packed, e0, e1), torch.bfloat16), bounds, out, e0)
    return out


def portable_grouped_mm_masked(
    x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, masked_m: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked variant ``[E, max_m, N]``: every row is computed (no host read of masked_m). Returns ``out``."""
    if out is None:
        out = torch.empty((x.shape[0], x.shape[1], n), dtype=torch.bfloat16, device=x.device)
    if takes_kernel(w_data, n, k, x.shape[1]):
        return portable_kernel.launch(x, w_data, n, k, masked_m, True, out)
    weights = _cached_weights(w_data, n, k)
    if weights is not None:
        return torch.bmm(x, weights.transpose(1, 2), out=out)
    packed = PackedMXFP4(w_data, n, k)
    step = _experts_per_chunk(n, k)
    for e0 in range(0, packed.num_experts, step):
        e1 = min(packed.num_experts, e0 + step)
        torch.bmm(x[e0:e1], dequantize(unpack_experts(packed, e0, e1), torch.bfloat16).transpose(1, 2), out=out[e0:e1])
    return out
