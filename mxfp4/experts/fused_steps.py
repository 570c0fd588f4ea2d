"""The gpt-oss expert layer on SM90, launch by launch: for FP8 activations (``mxfp4.moe(...,
activations="fp8")``) and for expert parallelism's foreign ids (``skip_invalid_ids=True``). The planned
five-kernel path (mxfp4.experts.fused) serves the plain bf16 layer.

The routing kernel (codegen.runtime.routing) groups the T·k choices by expert; a choice whose id is outside [0, E)
goes to a tail after ``offsets[E]`` with weight 0, where no GEMM reaches it, and its token slot starts at
zero (one memset, only with ``skip_invalid_ids``), so the sum over k adds exactly 0 for it. With FP8
activations the quantizer gathers x's rows as it quantizes them to e4m3 (one launch), and the gate_up kernel writes
the activated rows as e4m3 itself, with the static power-of-two scale that the clamp's bound on SwiGLU allows
(``mxfp4.ops.activations.swiglu_e4m3_scale``; a per-row scale would need each row's amax across every n-tile of
gate_up): no quantizer between the two GEMMs. Only an unbounded SwiGLU (alpha <= 0) has its activated rows
quantized per row by ``mxfp4.quantize_activations``, one launch more. The gate_up
kernel's epilogue applies the row scales, the bias and the clamped SwiGLU, the down kernel's the row scales,
the bias, the routing weight and the scatter to token slots; the top-k combine is a fixed-order sum over k.
No host sync, no atomics.
"""

from __future__ import annotations

import dataclasses

import torch

from codegen.build.config import TileConfig
from mxfp4.format.gate_up import PackedGateUp, PackedGateUpFP8
from mxfp4.format.layout import PackedMXFP4
from mxfp4.format.layout_fp8 import PackedMXFP4FP8
from mxfp4.ops.activations import (
    quantize_activations,
    quantize_gathered_rows,
    swiglu_e4m3_scale,
)

from .fused import fused_config


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.to(torch.bfloat16).contiguous()


def _rows(x: torch.Tensor, token: torch.Tensor | None, fp8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x's rows of ``token`` (all of x for None): bf16, or quantized per row to e4m3 with their scales (the
    quantizer gathering them: one launch)."""
    if not fp8:
        return (x if token is None else x.index_select(0, token)), None
    return quantize_activations(x) if token is None else quantize_gathered_rows(x, token)


def _project(x: torch.Tensor, x_scale: torch.Tensor | None, w: PackedMXFP4 | PackedMXFP4FP8, offsets: torch.Tensor,
             config: TileConfig, out: torch.Tensor, epilogue: object) -> None:
    """One grouped GEMM with its epilogue; e4m3 x on plain weights runs the W4A16 kernel on x widened to bf16."""
    from codegen.runtime.launch import grouped_mm_sm90

    if x_scale is not None:
        w_scale = w.row_scale if isinstance(w, PackedMXFP4FP8) else None
        epilogue = dataclasses.replace(epilogue, x_scale=x_scale, w_scale=w_scale)
        if w_scale is None:
            x = x.to(torch.bfloat16)
    grouped_mm_sm90(x, w.data, w.n, w.k, offsets, False, config, out, epilogue)


def moe_sm90_steps(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedGateUp | PackedGateUpFP8,
    down: PackedMXFP4 | PackedMXFP4FP8, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    alpha: float, limit: float, device_name: str | None, activations: str = "bf16", skip_invalid_ids: bool = False,
) -> torch.Tensor:
    """``mxfp4.moe`` on SM90 launch by launch (inputs validated by the op)."""
    # lazy: CPU machines never import cuda-python
    from codegen.runtime.launch import EpilogueArgs
    from codegen.runtime.routing import route_topk

    tokens, top_k = topk_ids.shape
    routed = tokens * top_k
    fp8 = activations == "fp8"
    routing = route_topk(topk_ids.contiguous(), topk_weights.contiguous(), gate_up.num_experts)
    rows, rows_scale = _rows(x, routing.row_token, fp8)
    swiglu = EpilogueArgs(bias=_bias(gate_up_bias), alpha=alpha, limit=limit)
    e4m3_scale = swiglu_e4m3_scale(alpha, limit) if fp8 else None
    if e4m3_scale is not None:  # the gate_up epilogue quantizes the activated rows
        activated = torch.empty((routed, down.k), dtype=torch.float8_e4m3fn, device=x.device)
        activated_scale = torch.empty(routed, dtype=torch.float32, device=x.device)
        swiglu = dataclasses.replace(swiglu, out_row_scale=activated_scale, out_scale=e4m3_scale)
    else:
        activated = torch.empty((routed, down.k), dtype=torch.bfloat16, device=x.device)
    _project(rows, rows_scale, gate_up, routing.offsets, fused_config(gate_up, routed, "swiglu", device_name), activated,
             swiglu)
    if e4m3_scale is None:
        activated, activated_scale = _rows(activated, None, fp8)
    # The down kernel writes the slot of every routed choice; a skipped choice's slot is never written.
    slots = (torch.zeros if skip_invalid_ids else torch.empty)((tokens, top_k, down.n), dtype=torch.bfloat16,
                                                                device=x.device)
    _project(activated, activated_scale, down, routing.offsets, fused_config(down, routed, "scatter", device_name), slots,
             EpilogueArgs(bias=_bias(down_bias), row_scale=routing.row_scale, row_dest=routing.row_dest))
    return slots.sum(dim=1)  # fp32 accumulation in a fixed order, one rounding to bf16
