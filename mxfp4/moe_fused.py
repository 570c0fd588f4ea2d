"""The gpt-oss expert layer on SM90 with the work fused into the generated kernels.

One routing kernel (codegen.routing) groups the T·k choices by expert on the device; x rows are gathered
with one index_select; the gate_up kernel's epilogue adds the bias and applies the clamped SwiGLU (its weight rows paired at
pack time, ``mxfp4.gate_up``), writing bf16 ``[T·k, I]``; the down kernel's epilogue adds the bias,
multiplies by the routing weight and writes each row to its token's slot, ``[T, k, H]``; the top-k
combine is a fixed-order sum over k. No host sync, no atomics: calls are bitwise identical and the
layer captures into a CUDA graph for a fixed T.

With ``skip_invalid_ids`` (expert parallelism) the routing kernel puts choices whose id is outside [0, E) after
``offsets[E]``, where no GEMM reaches them; their slots start at zero (one memset), so the sum over k adds
exactly 0 for them.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from codegen.config import TileConfig

from .dispatch import choose_config
from .gate_up import PackedGateUp
from .layout import PackedMXFP4


def fused_config(w: PackedMXFP4, rows: int, epilogue: str, device_name: str | None) -> TileConfig:
    """The tuned (or heuristic) config of this GEMM shape with ``epilogue``: the epilogue runs once per
    tile after the K loop, so the best plain-GEMM config is the fused kernel's too."""
    return _fused_config(w.num_experts, w.n, w.k, -(-rows // w.num_experts), epilogue, device_name)


@lru_cache(maxsize=1024)  # per call: keep it a dict lookup
def _fused_config(num_experts: int, n: int, k: int, hint: int, epilogue: str, device_name: str | None) -> TileConfig:
    return dataclasses.replace(choose_config(num_experts, n, k, hint, device_name).config, epilogue=epilogue)


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.to(torch.bfloat16).contiguous()


def moe_sm90(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedGateUp, down: PackedMXFP4,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, alpha: float, limit: float,
    device_name: str | None, skip_invalid_ids: bool = False,
) -> torch.Tensor:
    """``mxfp4.moe`` on SM90 (inputs validated by the op)."""
    # lazy: CPU machines never import cuda-python
    from codegen.launch import EpilogueArgs, grouped_mm_sm90
    from codegen.routing import route_topk

    tokens, top_k = topk_ids.shape
    routed = tokens * top_k
    routing = route_topk(topk_ids.contiguous(), topk_weights.contiguous(), gate_up.num_experts)
    rows = x.index_select(0, routing.row_token)
    activated = torch.empty((routed, down.k), dtype=torch.bfloat16, device=x.device)
    grouped_mm_sm90(
        rows, gate_up.data, gate_up.n, gate_up.k, routing.offsets, False,
        fused_config(gate_up, routed, "swiglu", device_name), activated,
        EpilogueArgs(bias=_bias(gate_up_bias), alpha=alpha, limit=limit),
    )
    # The down kernel writes the slot of every routed choice; a skipped choice's slot is never written.
    slots = (torch.zeros if skip_invalid_ids else torch.empty)((tokens, top_k, down.n), dtype=torch.bfloat16, device=x.device)
    grouped_mm_sm90(
        activated, down.data, down.n, down.k, routing.offsets, False,
        fused_config(down, routed, "scatter", device_name), slots,
        EpilogueArgs(bias=_bias(down_bias), row_scale=routing.row_scale, row_dest=routing.row_dest),
    )
    return slots.sum(dim=1)  # fp32 accumulation in a fixed order, one rounding to bf16
