"""The MoE routing kernel: top-k expert choices -> rows grouped by expert, in one launch.

``route_topk(topk_ids, topk_weights, num_experts)`` returns, for the T·k routed rows in expert order
(stable: flat (token, slot) order within an expert), the int32 ``offsets`` [E + 1], each row's flat
choice index ``row_dest`` (token * k + slot), its token ``row_token`` and its routing weight
``row_scale`` (fp32): what the fused MoE layer's gather, gate_up and down kernels read. Choices whose id is
outside [0, E) follow at ``offsets[E]``, in flat order, with weight 0 (no GEMM reaches them). It replaces a
sort, a search and three index ops (templates/mxfp4_routing.cuh says how), with no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from codegen.build.config import MAX_EXPERTS
from codegen.build.params import ParamBlock, ParamField

from .device_functions import DeviceFunctions
from .fast_driver import params_buffer

ROUTING_TEMPLATE = "moe_routing.cu.j2"
ROUTING_ENTRY = "mxfp4_moe_routing"
ROUTING_THREADS = 1024

ROUTING_PARAMS = ParamBlock((
    ParamField("topk_ids", "void const*", "Q", 8, "[T, k] int32 or int64"),
    ParamField("topk_weights", "void const*", "Q", 8, "[T, k] float32 or bf16"),
    ParamField("offsets", "int32_t*", "Q", 8, "out: [E + 1] row offsets per expert"),
    ParamField("row_dest", "int32_t*", "Q", 8, "out: flat choice index (token * k + slot) of each row"),
    ParamField("row_token", "int32_t*", "Q", 8, "out: token of each row"),
    ParamField("row_scale", "float*", "Q", 8, "out: routing weight of each row"),
    ParamField("routed", "int32_t", "i", 4, "T * k"),
    ParamField("top_k", "int32_t", "i", 4, "k"),
    ParamField("num_experts", "int32_t", "i", 4, "E"),
    ParamField("ids_int64", "int32_t", "i", 4, "1 when topk_ids is int64"),
    ParamField("weights_bf16", "int32_t", "i", 4, "1 when topk_weights is bf16"),
))
_ROUTING_STRUCT = ROUTING_PARAMS.struct  # packed once per call: keep the lookup out of the hot path


@dataclass(frozen=True)
class RoutedRows:
    """The routing of T·k rows (device tensors, views of one int32 buffer)."""

    offsets: torch.Tensor  # int32 [E + 1]
    row_dest: torch.Tensor  # int32 [T·k]
    row_token: torch.Tensor  # int32 [T·k]
    row_scale: torch.Tensor  # float32 [T·k]


def render_routing() -> str:
    """CUDA C++ source of the routing kernel."""
    from codegen.build.render import render_param_kernel

    return render_param_kernel(ROUTING_TEMPLATE, ROUTING_PARAMS, ROUTING_THREADS, ROUTING_ENTRY)


@lru_cache(maxsize=1)
def compiled_routing():
    """The routing kernel's cubin (NVRTC, disk-cached like every kernel)."""
    from codegen.build.compiler import compile_source

    return compile_source(render_routing(), "moe_routing", entry=ROUTING_ENTRY)


def _shared_memory(num_experts: int) -> int:
    """One int cursor per expert and one for the tail of foreign ids, then a chunk of ROUTING_THREADS staged
    buckets (int) and weights (float)."""
    return 4 * (num_experts + 1) + 8 * ROUTING_THREADS


# Loaded with the shared memory of the most experts a layer may have: one handle serves every layer.
_FUNCTIONS = DeviceFunctions("moe_routing", lambda: compiled_routing().cubin, _shared_memory(MAX_EXPERTS))


def route_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> RoutedRows:
    """Group the T·k choices of ``topk_ids`` [T, k] by expert (inputs validated by the caller)."""
    routed = topk_ids.numel()
    buffer = torch.empty(num_experts + 1 + 3 * routed, dtype=torch.int32, device=topk_ids.device)
    rows = RoutedRows(
        buffer[: num_experts + 1],
        buffer[num_experts + 1 : num_experts + 1 + routed],
        buffer[num_experts + 1 + routed : num_experts + 1 + 2 * routed],
        buffer[num_experts + 1 + 2 * routed :].view(torch.float32),
    )
    _ROUTING_STRUCT.pack_into(
        params_buffer(ROUTING_PARAMS.size), 0, topk_ids.data_ptr(), topk_weights.data_ptr(), rows.offsets.data_ptr(),
        rows.row_dest.data_ptr(), rows.row_token.data_ptr(), rows.row_scale.data_ptr(), routed, topk_ids.shape[-1],
        num_experts, int(topk_ids.dtype == torch.int64), int(topk_weights.dtype == torch.bfloat16),
    )
    from .launch import launch_on

    launch_on(topk_ids.device.index, _FUNCTIONS.get(topk_ids.device, ROUTING_ENTRY), 1, ROUTING_THREADS, _shared_memory(num_experts), "moe_routing")
    return rows


def routing_kernel(device: torch.device, num_experts: int) -> tuple[int, int, int]:
    """(CUfunction handle, threads, dynamic shared memory) of a routing launch for ``num_experts``
    (codegen.runtime.moe_plan packs ROUTING_PARAMS itself and launches it, alone or in a graph)."""
    return _FUNCTIONS.get(device, ROUTING_ENTRY), ROUTING_THREADS, _shared_memory(num_experts)
