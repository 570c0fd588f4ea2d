"""The gpt-oss expert layer in one call: ``mxfp4.moe`` (the torch op ``mxfp4::moe``).

The math is transformers' ``GptOssExperts.forward``: for token t and each of its k choices
(expert e = topk_ids[t, j], weight w = topk_weights[t, j])::

    h    = x[t] @ gate_up[e]^T + gate_up_bias[e]                 # [2I], gate/up interleaved
    gate = min(h[0::2], limit);  up = clamp(h[1::2], -limit, limit)
    a    = (up + 1) * gate * sigmoid(alpha * gate)               # [I]
    y    = a @ down[e]^T + down_bias[e]                          # [H]
    out[t] = sum over j of w * y                                  # in the order j = 0 .. k-1

Steps (each a small function, so fused-epilogue kernels can replace them one at a time):

* :func:`route` — stable sort of the flattened ids, int32 offsets [E + 1] by ``searchsorted``;
* :func:`gate_up_step` — gather x rows through the routing, ``mxfp4.grouped_mm``, bias + activation
  in float32, bf16 ``[T·k, I]``;
* :func:`down_step` — ``mxfp4.grouped_mm``, bias in float32, ``[T·k, H]``;
* :func:`combine` — un-permute to ``[T, k, H]``, scale by the routing weights, sum over k (a fixed-order
  reduction, no atomics), bf16 ``[T, H]``.

Expert parallelism (``skip_invalid_ids=True``): a choice whose id is outside ``[0, E)`` (transformers marks
another rank's expert with the sentinel id E) contributes exactly zero, whatever its weight. The fused SM90
path routes such choices to a tail no GEMM reaches and leaves their slot at zero; this composition runs them
through the last expert (wasted work, no data-dependent shape) and :func:`combine` selects zero for them, so
no value from their rows, not even a NaN, reaches the sum.

On CUDA nothing here reads a device value on the host and every shape depends on T, k, E, H and I
only (always T·k routed rows), so with a fixed T the whole layer captures into a CUDA graph: that is
the static-shape decode variant. Every step is deterministic, so calls are bitwise identical. On SM90
``mxfp4.grouped_mm`` runs the generated kernel; on other CUDA GPUs the portable path's in-register kernel
(offsets read on the device: no sync either); on the CPU the torch path. On the portable path a plain eager
call at small T replays this composition as one CUDA graph from its second call
(:mod:`mxfp4.experts.portable_graphs`): the same ops, so the same bits, for a fraction of the host time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import torch

from codegen.build.config import MAX_EXPERTS
from mxfp4.format.gate_up import (
    PAIR_CHANNELS,
    PackedGateUp,
    PackedGateUpFP8,
    is_paired,
    unpack_gate_up,
)
from mxfp4.format.layout import PackedMXFP4
from mxfp4.format.layout_fp8 import PackedMXFP4FP8
from mxfp4.format.packing import check_activations
from mxfp4.format.tensor import MXFP4Tensor
from mxfp4.ops.activations import quantize_activations, quantize_gathered_rows
from mxfp4.ops.dispatch import SM90, select_path
from mxfp4.ops.grouped_gemm import (
    debug_checks_enabled,
    grouped_mm_trusted,
    inference_only_backward,
    runs_directly,
)

from . import portable_graphs

ACTIVATIONS = ("gpt_oss",)
_ID_DTYPES = (torch.int32, torch.int64)
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The steps.


@dataclass(frozen=True)
class Routing:
    """Routed rows grouped by expert: row r is choice ``order[r]`` (= token * k + slot) of the flat top-k."""

    sorted_ids: torch.Tensor  # [T·k], ascending expert id of each routed row
    order: torch.Tensor  # int64 [T·k]
    offsets: torch.Tensor  # int32 [E + 1], rows offsets[e]:offsets[e + 1] go to expert e


def route(topk_ids: torch.Tensor, num_experts: int) -> Routing:
    """Group the T·k choices by expert on the device (no host sync; shapes independent of the ids)."""
    flat = topk_ids.reshape(-1)
    # Stable: ties keep token order, so the permutation (and everything after it) is deterministic.
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, dtype=flat.dtype, device=flat.device)
    # searchsorted, not bincount: bincount sizes its output from a device max (a sync).
    offsets = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    return Routing(sorted_ids, order, offsets)


def gpt_oss_activation(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """transformers' ``GptOssExperts._apply_gate`` on split gate / up: clamped SwiGLU, ``(up + 1) * (gate *
    sigmoid(gate * alpha))`` after the clamps (in place on its own temporaries: the same roundings, fewer
    allocations); a new contiguous tensor of gate's shape."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = (gate * alpha).sigmoid_().mul_(gate)
    return glu.mul_(up.add_(1))


def gathered_rows(x: torch.Tensor, token: torch.Tensor, activations: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x's rows of each routed row's token: bf16, or (activations "fp8") e4m3 with their row scales
    (mxfp4.ops.activations.quantize_gathered_rows: on SM90 the quantizer gathers them)."""
    if activations != "fp8":
        return x.index_select(0, token), None
    return quantize_gathered_rows(x, token)


def _gate_and_up(h: torch.Tensor, bias: torch.Tensor | None, sorted_ids: torch.Tensor,
                 paired: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up): float32 views of the gate_up product ``h`` [R, 2I] with the routed rows' bias added. h's
    columns are interleaved (gate, up of channel c at 2c, 2c + 1) or paired (``mxfp4.format.gate_up``); either
    way one view of h holds gate and up along dimension 2 ([R, I, 2], or [R, I/8, 2, 8] paired), and the
    bias, stored interleaved as in the checkpoint, takes the same view: nothing is copied to split them."""
    inter = h.shape[1] // 2
    shape = (inter // PAIR_CHANNELS, 2, PAIR_CHANNELS) if paired else (inter, 2)
    hv = h.float().view(-1, *shape)
    if bias is not None:
        if paired:  # interleaved [E, I/8, 8, 2] -> [E, I/8, 2, 8]: paired row 16b + 8i + j is 16b + 2j + i
            view = bias.reshape(bias.shape[0], inter // PAIR_CHANNELS, PAIR_CHANNELS, 2).transpose(2, 3)
        else:
            view = bias.reshape(bias.shape[0], inter, 2)
        hv += view.index_select(0, sorted_ids)  # float32 += the bias's own dtype (exact)
    return hv.select(2, 0), hv.select(2, 1)


def gate_up_step(
    x: torch.Tensor, routing: Routing, top_k: int, gate_up: PackedMXFP4 | PackedMXFP4FP8, bias: torch.Tensor | None,
    alpha: float, limit: float, activations: str = "bf16",
) -> torch.Tensor:
    """Gather, gate_up GEMM, bias and activation: bf16 ``[T·k, I]`` in routed order."""
    token = routing.order // top_k if top_k > 1 else routing.order
    rows, x_scale = gathered_rows(x, token, activations)
    h = grouped_mm_trusted(rows, gate_up, routing.offsets, x_scale)
    gate, up = _gate_and_up(h, bias, routing.sorted_ids, is_paired(gate_up))
    return gpt_oss_activation(gate, up, alpha, limit).to(torch.bfloat16).reshape(h.shape[0], -1)


def down_step(a: torch.Tensor, routing: Routing, down: PackedMXFP4 | PackedMXFP4FP8, bias: torch.Tensor | None,
              activations: str = "bf16") -> torch.Tensor:
    """Down GEMM and bias: float32 ``[T·k, H]`` in routed order (activations "fp8": ``a`` quantized per row first)."""
    if activations == "fp8":
        a_fp8, a_scale = quantize_activations(a)
        y = grouped_mm_trusted(a_fp8, down, routing.offsets, a_scale).float()
    else:
        y = grouped_mm_trusted(a, down, routing.offsets).float()
    if bias is not None:
        y += bias.index_select(0, routing.sorted_ids)  # float32 += the bias's own dtype (exact)
    return y


def combine(y: torch.Tensor, routing: Routing, topk_weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Back to token order, times the routing weights, summed over the k choices: bf16 ``[T, H]``.

    ``valid`` (bool ``[T, k]``, optional): choices where it is False contribute exactly 0 (a select, not a
    multiply, so not even a NaN in their rows gets through)."""
    num_tokens, top_k = topk_weights.shape
    # order is a permutation, so this scatter writes each row once (deterministic).
    weighted = torch.empty_like(y).index_copy_(0, routing.order, y).view(num_tokens, top_k, -1)
    weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    weighted *= weights.unsqueeze(-1)
    if valid is not None:
        weighted = torch.where(valid.unsqueeze(-1), weighted, 0.0)
    return weighted.sum(dim=1).to(torch.bfloat16)


def foreign_to_last_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids outside ``[0, E)`` replaced by E - 1 (so every routed row belongs to an expert and the offsets end at
    T·k), and the bool ``[T, k]`` mask of the choices that were in range (for :func:`combine`)."""
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    return torch.where(valid, topk_ids, num_experts - 1), valid


# ---------------------------------------------------------------------------------------------
# Validation (shapes, dtypes and devices always; id values only where that costs no device sync).


def _check_dtype_and_shape(name: str, t: torch.Tensor, dtypes: tuple, shape: tuple, what: str, x: torch.Tensor) -> None:
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"moe: {name} must be {names}, got {t.dtype}")
    if t.shape != shape:  # torch.Size against a tuple: no conversion per call
        raise ValueError(f"moe: {name} must have shape {what} = {list(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"moe: {name} is on {t.device} but x is on {x.device}; they must share a device")


def _check_weights(gate_up: PackedMXFP4, down: PackedMXFP4, hidden: int) -> int:
    """The intermediate size I, after checking gate_up [E, 2I, H] against down [E, H, I]."""
    if gate_up.k != hidden:
        raise ValueError(f"moe: gate_up is {list(gate_up.shape)} but x has H = {hidden}; gate_up must be [E, 2I, H]")
    if gate_up.n % 2:
        raise ValueError(f"moe: gate_up has N = {gate_up.n} rows; it must be [E, 2I, H] (interleaved gate/up)")
    if not 1 <= gate_up.num_experts <= MAX_EXPERTS:
        raise ValueError(f"moe: gate_up has {gate_up.num_experts} experts; 1 to {MAX_EXPERTS} are supported")
    if down.num_experts != gate_up.num_experts:
        raise ValueError(f"moe: gate_up has {gate_up.num_experts} experts but down has {down.num_experts}")
    if down.n != hidden:
        raise ValueError(f"moe: down is {list(down.shape)} but x has H = {hidden}; down must be [E, H, I]")
    if down.k != gate_up.n // 2:
        raise ValueError(f"moe: down is {list(down.shape)} but gate_up is {list(gate_up.shape)}: down must be [E, H, I] with 2I = {gate_up.n}")
    return down.k


def _check_bias(name: str, bias: torch.Tensor | None, shape: tuple, what: str, x: torch.Tensor) -> None:
    if bias is None:
        return
    if not bias.is_floating_point():
        raise TypeError(f"moe: {name} must be a floating-point tensor, got {bias.dtype}")
    _check_dtype_and_shape(name, bias, (bias.dtype,), shape, what, x)


def _check_ids_values(topk_ids: torch.Tensor, num_experts: int) -> None:
    if topk_ids.device.type != "cpu" and not debug_checks_enabled():
        return  # a value check on a device tensor would sync; mxfp4.set_debug_checks(True) turns it on
    if topk_ids.numel() == 0:
        return
    low, high = int(topk_ids.min()), int(topk_ids.max())
    if low < 0 or high >= num_experts:
        bad = low if low < 0 else high
        raise ValueError(f"moe: topk_ids holds expert {bad}, outside [0, E = {num_experts})")


def _check_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4 | PackedMXFP4FP8,
    down: PackedMXFP4 | PackedMXFP4FP8, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    activation: str, alpha: float, limit: float, activations: str = "bf16",
) -> None:
    inter = _check_routed_input(x, topk_ids, gate_up, down)
    _check_dtype_and_shape("topk_weights", topk_weights, _WEIGHT_DTYPES, topk_ids.shape, "[T, k]", x)
    hidden, experts = x.shape[1], gate_up.num_experts
    _check_bias("gate_up_bias", gate_up_bias, (experts, 2 * inter), "[E, 2I]", x)
    _check_bias("down_bias", down_bias, (experts, hidden), "[E, H]", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe: activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_scalars(alpha, limit)
    _check_layer_activations(activations, gate_up, down)


def _check_weight_values(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                         skip_invalid_ids: bool) -> None:
    """After ``mxfp4.set_debug_checks(True)``: every routing weight that counts is finite. Otherwise (reading the
    weights would sync the host) a NaN or Inf weight makes its own token's output row non-finite, and only that row."""
    if not debug_checks_enabled() or topk_weights.numel() == 0:
        return
    bad = ~torch.isfinite(topk_weights)
    if skip_invalid_ids:  # a foreign choice contributes exactly zero, whatever its weight
        bad &= (topk_ids >= 0) & (topk_ids < num_experts)
    if bool(bad.any()):
        token, choice = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"moe: topk_weights[{token}, {choice}] is {float(topk_weights[token, choice])}; routing weights must be "
            "finite (checked under mxfp4.set_debug_checks(True); without it, that token's output row is not finite)")


def _check_routed_input(x: torch.Tensor, topk_ids: torch.Tensor, gate_up: PackedMXFP4, down: PackedMXFP4) -> int:
    """x, topk_ids and the two weights (what explain_moe knows of a call); returns I."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"moe: x must be bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"moe: x must be [T, H], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("moe: x must be contiguous; pass x.contiguous()")
    tokens, hidden = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_ids.shape[1] < 1:
        raise ValueError(f"moe: topk_ids must be [T, k] with T = x.shape[0] = {tokens} and k >= 1, got {tuple(topk_ids.shape)}")
    _check_dtype_and_shape("topk_ids", topk_ids, _ID_DTYPES, topk_ids.shape, "[T, k]", x)
    for name, w in (("gate_up", gate_up), ("down", down)):
        if w.device != x.device:
            raise ValueError(f"moe: {name} is on {w.device} but x is on {x.device}; move it with {name}.to(x.device)")
    return _check_weights(gate_up, down, hidden)


def _check_layer_activations(activations: str, gate_up: object, down: object) -> None:
    """FP8-ready weights (``mxfp4.pack(w, activations="fp8")``) only meet FP8 activations."""
    if check_activations("moe", activations) == "fp8":
        return
    for name, w in (("gate_up", gate_up), ("down", down)):
        if isinstance(w, PackedMXFP4FP8):
            raise TypeError(f"moe: {name} was packed for FP8 activations (activations='fp8' at pack time) but "
                            "activations='bf16'; pass activations='fp8', or pack it with activations='bf16'")


# Signatures of calls that passed _check_moe: the checks are a pure function of the signature (dtypes,
# shapes, devices, contiguity, the weights' sizes, the options), so a call with a known one passes too.
_passed: dict[tuple, None] = {}
_PASSED_LIMIT = 1024


def _tensor_signature(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, t.shape, t.device)


def _call_signature(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4 | PackedMXFP4FP8,
    down: PackedMXFP4 | PackedMXFP4FP8, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    activation: object, alpha: object, limit: object, activations: str,
) -> tuple:
    """Everything _check_moe reads (the types of alpha and limit too: True == 1 but a bool is refused; the
    weights' layouts, which decide what activations they take)."""
    return (type(gate_up), type(down), activations,
        x.dtype, x.shape, x.device, x.is_contiguous(), topk_ids.dtype, topk_ids.shape, topk_ids.device,
        topk_weights.dtype, topk_weights.shape, topk_weights.device,
        gate_up.n, gate_up.k, gate_up.data.shape, gate_up.data.device, down.n, down.k, down.data.shape, down.data.device,
        _tensor_signature(gate_up_bias), _tensor_signature(down_bias), activation, type(alpha), alpha, type(limit), limit,
    )


def _check_scalars(alpha: object, limit: object) -> None:
    for name, value in (("alpha", alpha), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"moe: {name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"moe: {name} must be finite, got {value}")
    if limit <= 0:  # the clamps would pin up (and bound gate) at a non-positive value: a meaningless layer
        raise ValueError(f"moe: limit must be positive (the SwiGLU clamp, gpt-oss: 7.0), got {limit}")


# ---------------------------------------------------------------------------------------------
# The custom op (plain tensors and scalars) and its fake kernel.


def _weight(data: torch.Tensor, n: int, k: int, scale: torch.Tensor | None, paired: bool) -> PackedMXFP4 | PackedMXFP4FP8:
    """The packed weight an op argument list describes: the FP8-ready layout when it has row scales."""
    if scale is None:
        return (PackedGateUp if paired else PackedMXFP4)(data, n, k)
    return (PackedGateUpFP8 if paired else PackedMXFP4FP8)(data, scale, n, k)


def _moe_impl(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    gate_up_data: torch.Tensor, gate_up_n: int, gate_up_k: int, gate_up_paired: bool,
    down_data: torch.Tensor, down_n: int, down_k: int,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    activation: str, alpha: float, limit: float, activations: str = "bf16",
    gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None, skip_invalid_ids: bool = False,
) -> torch.Tensor:
    gate_up = _weight(gate_up_data, gate_up_n, gate_up_k, gate_up_scale, gate_up_paired)
    down = _weight(down_data, down_n, down_k, down_scale, False)
    return _moe_validated(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit,
                          activations, skip_invalid_ids=skip_invalid_ids)


def _moe_validated(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4 | PackedMXFP4FP8,
    down: PackedMXFP4 | PackedMXFP4FP8, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    activation: str, alpha: float, limit: float, activations: str = "bf16", direct: bool = False,
    skip_invalid_ids: bool = False,
) -> torch.Tensor:
    """Every check of the op, then the layer. ``direct``: a plain eager call (see ``runs_directly``), which
    the SM90 path may serve with a graph replay (mxfp4.experts.graphs)."""
    signature = _call_signature(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha,
                                limit, activations)
    if signature not in _passed:
        _check_moe(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit,
                   activations)
        if len(_passed) >= _PASSED_LIMIT:
            _passed.clear()
        _passed[signature] = None
    if not skip_invalid_ids:
        _check_ids_values(topk_ids, gate_up.num_experts)
    _check_weight_values(topk_weights, topk_ids, gate_up.num_experts, skip_invalid_ids)
    return _moe_checked(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, alpha, limit, activations,
                        direct, skip_invalid_ids)


def _moe_checked(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4 | PackedMXFP4FP8,
    down: PackedMXFP4 | PackedMXFP4FP8, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    alpha: float, limit: float, activations: str = "bf16", direct: bool = False, skip_invalid_ids: bool = False,
) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.empty_like(x)
    choice = select_path(x.device)
    if choice.path == SM90 and is_paired(gate_up):
        if activations == "fp8" or skip_invalid_ids:  # launch by launch: FP8 activations, foreign ids
            from .fused_steps import moe_sm90_steps

            steps = partial(_sm90_steps, moe_sm90_steps, choice.device_name)
            if direct:  # a plain eager call: replayed as one CUDA graph where it may be
                out = portable_graphs.replay_layer(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias,
                                                   alpha, limit, activations, skip_invalid_ids, steps,
                                                   portable_graphs.SM90_STEPS)
                if out is not None:
                    return out
            return steps(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, alpha, limit, activations,
                         skip_invalid_ids)
        return _moe_sm90()(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, alpha, limit,
                           choice.device_name, may_replay=direct)
    if direct and choice.path != SM90:  # a plain eager call: replayed as one CUDA graph where it may be
        out = portable_graphs.replay_layer(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, alpha,
                                           limit, activations, skip_invalid_ids, moe_composition)
        if out is not None:
            return out
    return moe_composition(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, alpha, limit,
                           activations, skip_invalid_ids)


def _sm90_steps(run: Callable[..., torch.Tensor], device_name: str | None, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, gate_up: object, down: object, gate_up_bias: torch.Tensor | None,
                down_bias: torch.Tensor | None, alpha: float, limit: float, activations: str,
                skip_invalid_ids: bool) -> torch.Tensor:
    """The SM90 layer's steps (``run``: fused_steps.moe_sm90_steps) in moe_composition's argument order, the
    device's name bound: what the portable replay captures for them."""
    return run(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, alpha, limit, device_name,
               activations, skip_invalid_ids)


def moe_composition(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4 | PackedMXFP4FP8,
    down: PackedMXFP4 | PackedMXFP4FP8, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    alpha: float, limit: float, activations: str = "bf16", skip_invalid_ids: bool = False,
) -> torch.Tensor:
    """The layer from the steps above: routing, two ``grouped_mm`` calls and torch ops (every path but the fused
    SM90 one; inputs validated). No host read of a device value: it captures into a CUDA graph."""
    valid = None
    if skip_invalid_ids:
        topk_ids, valid = foreign_to_last_expert(topk_ids, gate_up.num_experts)
    routing = route(topk_ids, gate_up.num_experts)
    a = gate_up_step(x, routing, topk_ids.shape[1], gate_up, gate_up_bias, alpha, limit, activations)
    y = down_step(a, routing, down, down_bias, activations)
    return combine(y, routing, topk_weights, valid)


@lru_cache(maxsize=1)
def _moe_sm90() -> Callable[..., torch.Tensor]:
    """mxfp4.experts.fused.moe_sm90, imported on the first SM90 call (it brings in the CUDA driver bindings)."""
    from .fused import moe_sm90

    return moe_sm90


_moe_op = torch.library.custom_op("mxfp4::moe", mutates_args=())(_moe_impl)
_moe_op.register_autograd(inference_only_backward("moe"))


@_moe_op.register_fake
def _moe_fake(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    gate_up_data: torch.Tensor, gate_up_n: int, gate_up_k: int, gate_up_paired: bool,
    down_data: torch.Tensor, down_n: int, down_k: int,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    activation: str, alpha: float, limit: float, activations: str = "bf16",
    gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None, skip_invalid_ids: bool = False,
) -> torch.Tensor:
    """The same checks as _moe_impl (shapes only), and the output's shape: x's (skip_invalid_ids changes no shape)."""
    gate_up = _weight(gate_up_data, gate_up_n, gate_up_k, gate_up_scale, gate_up_paired)
    down = _weight(down_data, down_n, down_k, down_scale, False)
    _check_moe(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation, alpha, limit, activations)
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------
# The user API.


def _check_tensors(**named: object) -> None:
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"moe: {name} must be a torch.Tensor, got {type(value).__name__}")


def _packed(name: str, w: object) -> PackedMXFP4 | PackedMXFP4FP8:
    if isinstance(w, MXFP4Tensor):
        raise TypeError(f"moe: {name} is an unpacked MXFP4Tensor; call {name} = mxfp4.pack({name}) once (at load time)")
    if not isinstance(w, (PackedMXFP4, PackedMXFP4FP8)):
        raise TypeError(f"moe: {name} must be a PackedMXFP4 (from mxfp4.pack), got {type(w).__name__}")
    return w


def _check_python_arguments(x: object, topk_ids: object, topk_weights: object, gate_up_bias: object,
                            down_bias: object, activation: object, activations: object, alpha: object,
                            limit: object) -> None:
    """What the op's schema cannot take, checked before it sees the arguments."""
    _check_tensors(x=x, topk_ids=topk_ids, topk_weights=topk_weights)
    for name, bias in (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise TypeError(f"moe: {name} must be a torch.Tensor or None, got {type(bias).__name__}")
    _check_scalars(alpha, limit)
    if not isinstance(activation, str):
        raise TypeError(f"moe: activation must be a str, got {type(activation).__name__}")
    check_activations("moe", activations)


def moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedMXFP4 | PackedMXFP4FP8,
    down: PackedMXFP4 | PackedMXFP4FP8, *, gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None, activation: str = "gpt_oss", alpha: float = 1.702, limit: float = 7.0,
    activations: str = "bf16", skip_invalid_ids: bool = False,
) -> torch.Tensor:
    """The gpt-oss MoE expert layer (transformers' ``GptOssExperts.forward``); see the module docstring.

    x: bf16 ``[T, H]``; topk_ids: int32/int64 ``[T, k]`` in ``[0, E)``; topk_weights: float32/bf16 ``[T, k]``;
    gate_up: ``mxfp4.pack_gate_up`` (rows paired: the fused SM90 kernels) or ``mxfp4.pack`` (the unfused
    composition) of ``[E, 2I, H]`` with gate/up rows interleaved, as gpt-oss stores them;
    down: ``mxfp4.pack`` of ``[E, H, I]``; biases ``[E, 2I]`` / ``[E, H]`` or None. Returns bf16 ``[T, H]``.
    ``activations="fp8"``: the layer quantizes x (per token) and the activated rows (per row; the fused SM90 layer
    in gate_up's epilogue, with the static power-of-two scale that SwiGLU's clamp allows:
    ``mxfp4.ops.activations.swiglu_e4m3_scale``) to e4m3 (``mxfp4.quantize_activations``) and runs the W4A8 kernels
    on weights packed with ``activations="fp8"``
    (plain packed weights work too, on the W4A16 kernels); the README states the accuracy traded.

    No host sync on CUDA (ids are range-checked by value only on the CPU, or after
    ``mxfp4.set_debug_checks(True)``), deterministic, and capturable into a CUDA graph for a fixed T
    (the static-shape decode variant); works under ``torch.compile(fullgraph=True)``.

    Routing weights are not read on the host: a NaN or Inf in ``topk_weights[t]`` makes output row t non-finite
    (NaN or Inf) and leaves every other row as it would be, as the same float math in torch would. After
    ``mxfp4.set_debug_checks(True)`` (one device sync per call) such a weight is a ValueError naming it.

    ``skip_invalid_ids=True`` (expert parallelism: this rank holds E of the model's experts, and transformers
    hands other ranks' choices over as the sentinel id E with weight 0): a choice whose id is outside
    ``[0, E)`` contributes exactly zero to its token's sum, whatever its weight; no id is range-checked.
    """
    _check_python_arguments(x, topk_ids, topk_weights, gate_up_bias, down_bias, activation, activations, alpha, limit)
    gate_up, down = _packed("gate_up", gate_up), _packed("down", down)
    if not isinstance(skip_invalid_ids, bool):
        raise TypeError(f"moe: skip_invalid_ids must be a bool, got {type(skip_invalid_ids).__name__}")
    if runs_directly(x):  # the same checks and layer as the op's, without the dispatch and the re-wrapping
        return _moe_validated(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, activation,
                              float(alpha), float(limit), activations, direct=True, skip_invalid_ids=skip_invalid_ids)
    scale = lambda w: w.row_scale if isinstance(w, PackedMXFP4FP8) else None  # noqa: E731
    return torch.ops.mxfp4.moe(
        x, topk_ids, topk_weights, gate_up.data, gate_up.n, gate_up.k, is_paired(gate_up),
        down.data, down.n, down.k, gate_up_bias, down_bias, activation, float(alpha), float(limit), activations,
        scale(gate_up), scale(down), skip_invalid_ids,
    )


# ---------------------------------------------------------------------------------------------
# float64 reference (tests): transformers' per-token loop, on the dequantized weights.


def reference_moe_float64(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    gate_up: PackedMXFP4 | MXFP4Tensor, down: PackedMXFP4 | MXFP4Tensor,
    gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
    alpha: float = 1.702, limit: float = 7.0, skip_invalid_ids: bool = False,
) -> torch.Tensor:
    """float64 ``[T, H]``, written token by token from the definition (test sizes only); with
    ``skip_invalid_ids`` the choices whose id is outside ``[0, E)`` are left out of the sum."""
    from mxfp4.format.codec import dequantize
    from mxfp4.format.packing import unpack

    def natural(w: PackedMXFP4 | PackedMXFP4FP8 | MXFP4Tensor) -> MXFP4Tensor:
        if is_paired(w):
            return unpack_gate_up(w)
        return unpack(w) if isinstance(w, (PackedMXFP4, PackedMXFP4FP8)) else w

    w1, w2 = (dequantize(natural(w), torch.float64).to(x.device) for w in (gate_up, down))
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if skip_invalid_ids and not 0 <= e < w1.shape[0]:
                continue
            h = w1[e] @ x[t].double()
            if gate_up_bias is not None:
                h = h + gate_up_bias[e].double()
            gate, up = h[0::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
            y = w2[e] @ ((up + 1) * gate * torch.sigmoid(alpha * gate))
            if down_bias is not None:
                y = y + down_bias[e].double()
            out[t] += float(topk_weights[t, j]) * y
    return out


def _explain_fused_layer(x: torch.Tensor, routed: int, gate_up: PackedMXFP4 | PackedMXFP4FP8,
                         down: PackedMXFP4 | PackedMXFP4FP8, device_name: str | None, activations: str,
                         skip_invalid_ids: bool) -> list[str]:
    """explain_moe's lines for the fused SM90 layer: the planned five kernels, or the launch-by-launch steps (FP8
    activations, foreign ids), how an eager call launches them, and the two GEMMs' configs."""
    from .fused import fused_config
    from .graphs import GRAPH_MAX_TOKENS, moe_graphs_enabled

    if activations == "fp8" or skip_invalid_ids:
        gather = "the quantizer gathering x's rows to e4m3" if activations == "fp8" else "gather"
        between = (" writing the activated rows as e4m3 (a static power-of-two scale from the clamp's bound; an "
                   "alpha <= 0 quantizes them per row, one launch more)") if activations == "fp8" else ""
        layer = (f"fused epilogues, launch by launch: device routing, {gather}, gate_up with the SwiGLU "
                 f"epilogue{between}, down with the scatter epilogue (bias, routing weight, token slots), top-k sum "
                 "in slot order")
        replay = portable_graphs.explain_replay(x, -(-routed // gate_up.num_experts), activations,
                                                portable_graphs.SM90_STEPS)
    else:
        layer = ("fused: device routing, gather, gate_up with the SwiGLU epilogue, down with the scatter epilogue "
                 "(bias, routing weight, token slots), top-k sum in slot order: five kernels")
        replay = (f"plain eager calls at T <= {GRAPH_MAX_TOKENS} replay the five as one CUDA graph from their second "
                  "call (bf16 contiguous biases)" if moe_graphs_enabled() else "off (set_moe_graphs(False) or "
                  "HOPPER_MXFP4_MOE_GRAPHS=0): five launches per call")
    lines = [f"  layer:     {layer}", f"  launches:  {replay}"]
    for name, w, kind in (("gate_up", gate_up, "swiglu"), ("down", down, "scatter")):
        config = fused_config(w, routed, kind, device_name)
        lines.append(f"  {name + ':':10s} {config.name} ({config.family})")
    return lines


def explain_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, gate_up: PackedMXFP4 | PackedMXFP4FP8, down: PackedMXFP4 | PackedMXFP4FP8,
    *, activations: str = "bf16", skip_invalid_ids: bool = False,
) -> str:
    """What ``mxfp4.moe(x, topk_ids, ..., gate_up, down, activations=..., skip_invalid_ids=...)`` would run, and why.

    Runs the op's checks of what it is given first (raising what the call would raise; the ids' values
    only where the op reads them: on the CPU, or with debug checks on, and not with skip_invalid_ids)."""
    _check_tensors(x=x, topk_ids=topk_ids)
    gate_up, down = _packed("gate_up", gate_up), _packed("down", down)
    _check_routed_input(x, topk_ids, gate_up, down)
    if not skip_invalid_ids:
        _check_ids_values(topk_ids, gate_up.num_experts)
    _check_layer_activations(activations, gate_up, down)
    routed = topk_ids.numel()
    choice = select_path(x.device)
    paired = is_paired(gate_up)
    lines = [
        f"mxfp4.moe: T = {x.shape[0]} tokens x top-{topk_ids.shape[-1]} = {routed} routed rows, "
        f"E = {gate_up.num_experts}, H = {down.n}, I = {down.k}",
        f"  path:      {choice.path}: {choice.reason}",
        "  activations: " + ("fp8: x quantized per token (e4m3, one float32 scale per row, "
                             "mxfp4.quantize_activations), the activated rows per row, or by the fused SM90 "
                             "gate_up with the static scale of SwiGLU's clamp" if activations == "fp8" else "bf16"),
    ]
    if choice.path == SM90 and paired:
        lines += _explain_fused_layer(x, routed, gate_up, down, choice.device_name, activations, skip_invalid_ids)
    elif choice.path == SM90:
        lines.append("  layer:     unfused: gate_up is not paired (pack it with mxfp4.pack_gate_up for the fused "
                     "kernels); two grouped_mm calls with the bias, activation and combine in torch")
    else:
        from mxfp4.portable.fallback import choose_mode

        rows = -(-routed // gate_up.num_experts)
        mode = choose_mode(gate_up.data, gate_up.n, gate_up.k, rows)[0]
        lines.append(f"  layer:     portable: two grouped_mm calls on the portable path ({mode} for about {rows} rows "
                     "per expert; mxfp4.explain gives the memory), torch for the rest")
        lines.append(f"  launches:  {portable_graphs.explain_replay(x, rows, activations)}")
    if skip_invalid_ids:
        lines.append(f"  ids:       outside [0, {gate_up.num_experts}) contribute zero (expert parallelism: other ranks' experts)")
    return "\n".join(lines)
