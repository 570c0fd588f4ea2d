"""The gpt-oss expert layer on SM90 with the work fused into the generated kernels.

One routing kernel (codegen.routing) groups the T·k choices by expert on the device; x rows are gathered
with one index_select; the gate_up kernel's epilogue adds the bias and applies the clamped SwiGLU (its weight rows paired at
pack time, ``mxfp4.gate_up``), writing bf16 ``[T·k, I]``; the down kernel's epilogue adds the bias,
multiplies by the routing weight and writes each row to its token's slot, ``[T, k, H]``; the top-k
combine is a fixed-order sum over k. No host sync, no atomics: calls are bitwise identical and the
layer captures into a CUDA graph for a fixed T.

With ``activations="fp8"``, x is quantized per token before the gather (the gather then moves one byte per
value) and the activated rows per row between the two kernels (``mxfp4.quantize_activations``: one kernel
each; the per-row amax of an activated row spans every n-tile of the gate_up kernel, so it is not in its
epilogue); both kernels apply the row scales in their epilogues.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from codegen.config import TileConfig

from .activations import quantize_activations
from .dispatch import choose_config
from .gate_up import PackedGateUp, PackedGateUpFP8
from .layout import PackedMXFP4
from .layout_fp8 import PackedMXFP4FP8


def fused_config(w: PackedMXFP4 | PackedMXFP4FP8, rows: int, epilogue: str, device_name: str | None) -> TileConfig:
    """The tuned (or heuristic) config of this GEMM shape with ``epilogue``, of the weight's family (W4A8 for the
    FP8-ready layout): the epilogue runs once per tile after the K loop, so the best plain-GEMM config is the
    fused kernel's too."""
    activations = "fp8" if isinstance(w, PackedMXFP4FP8) else "bf16"
    return _fused_config(w.num_experts, w.n, w.k, -(-rows // w.num_experts), epilogue, device_name, activations)


@lru_cache(maxsize=1024)  # per call: keep it a dict lookup
def _fused_config(num_experts: int, n: int, k: int, hint: int, epilogue: str, device_name: str | None,
                  activations: str) -> TileConfig:
    chosen = choose_config(num_experts, n, k, hint, device_name, activations).config
    return dataclasses.replace(chosen, epilogue=epilogue)


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.to(torch.bfloat16).contiguous()


def _fp8_rows(x: torch.Tensor, token: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantized per row to e4m3 (then, if ``token`` is given, gathered by it: one byte per value moved)."""
    x_fp8, x_scale = quantize_activations(x)
    if token is None:
        return x_fp8, x_scale
    return x_fp8.view(torch.uint8).index_select(0, token).view(torch.float8_e4m3fn), x_scale.index_select(0, token)


def _project(x: torch.Tensor, x_scale: torch.Tensor | None, w: PackedMXFP4 | PackedMXFP4FP8, offsets: torch.Tensor,
             config: TileConfig, out: torch.Tensor, epilogue: object) -> None:
    """One grouped GEMM with its epilogue; e4m3 x on plain weights runs the W4A16 kernel on x widened to bf16."""
    from codegen.launch import grouped_mm_sm90

    w_scale = w.row_scale if isinstance(w, PackedMXFP4FP8) else None
    if x_scale is not None:
        epilogue = dataclasses.replace(epilogue, x_scale=x_scale, w_scale=w_scale)
        if w_scale is None:
            x = x.to(torch.bfloat16)
    grouped_mm_sm90(x, w.data, w.n, w.k, offsets, False, config, out, epilogue)


def moe_sm90(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedGateUp | PackedGateUpFP8,
    down: PackedMXFP4 | PackedMXFP4FP8, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    alpha: float, limit: float, device_name: str | None, activations: str = "bf16",
) -> torch.Tensor:
    """``mxfp4.moe`` on SM90 (inputs validated by the op)."""
    # lazy: CPU machines never import cuda-python
    from codegen.launch import EpilogueArgs
    from codegen.routing import route_topk

    tokens, top_k = topk_ids.shape
    routed = tokens * top_k
    fp8 = activations == "fp8"
    routing = route_topk(topk_ids.contiguous(), topk_weights.contiguous(), gate_up.num_experts)
    rows, rows_scale = _fp8_rows(x, routing.row_token) if fp8 else (x.index_select(0, routing.row_token), None)
    activated = torch.empty((routed, down.k), dtype=torch.bfloat16, device=x.device)
    _project(rows, rows_scale, gate_up, routing.offsets, fused_config(gate_up, routed, "swiglu", device_name), activated,
             EpilogueArgs(bias=_bias(gate_up_bias), alpha=alpha, limit=limit))
    activated, activated_scale = _fp8_rows(activated, None) if fp8 else (activated, None)
    slots = torch.empty((tokens, top_k, down.n), dtype=torch.bfloat16, device=x.device)
    _project(activated, activated_scale, down, routing.offsets, fused_config(down, routed, "scatter", device_name), slots,
             EpilogueArgs(bias=_bias(down_bias), row_scale=routing.row_scale, row_dest=routing.row_dest))
    return slots.sum(dim=1)  # fp32 accumulation in a fixed order, one rounding to bf16
