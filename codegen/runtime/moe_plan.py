"""The fused MoE layer's five launches on SM90, planned once per shape: routing, gather, gate_up (SwiGLU
epilogue), down (scale-scatter epilogue), top-k sum.

Everything the layer needs between its input and its output lives in one workspace (``WorkspaceLayout``:
the routing, the gathered rows, the activated rows, the token slots and the GEMMs' stream-K space), so a
call allocates that and its output and nothing else, and makes no torch op: the kernels read and write
raw addresses. A ``MoePlan`` packs each kernel's parameter block from a call's addresses (``LayerCall``)
and launches the five in order on a stream (``run``), or hands them to a CUDA graph
(``KernelNode``s, mxfp4.experts.graphs) whose per-call addresses it packs again before each replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from codegen.build.config import TileConfig
from codegen.build.params import PARAM_FIELDS, PARAMS_SIZE, PARAMS_STRUCT

from . import moe_glue
from .dependent_launch import dependent_launch_enabled
from .fast_driver import launch, params_buffer
from .graph_driver import KernelNode
from .launch import (
    LoadedKernel,
    encode_x_map,
    grid_size,
    load,
    stream_k_sizes,
    tile_bound,
)
from .routing import ROUTING_PARAMS, routing_kernel

WORKSPACE_ALIGN = 256  # every region starts on a 256-byte boundary (TMA needs 16, vector copies 16)
_DOWN_ALPHA, _DOWN_LIMIT = 1.702, 7.0  # unused by the scatter epilogue; the values EpilogueArgs defaults to
_ROUTING, _GATHER, _SUM = ROUTING_PARAMS.struct, moe_glue.GATHER_PARAMS.struct, moe_glue.TOPK_SUM_PARAMS.struct


def _align(nbytes: int) -> int:
    return -(-nbytes // WORKSPACE_ALIGN) * WORKSPACE_ALIGN


@dataclass(frozen=True)
class LayerShape:
    tokens: int  # T
    top_k: int  # k
    num_experts: int  # E
    hidden: int  # H (gate_up's K, down's N)
    inter: int  # I (down's K; gate_up's N is 2I)

    @property
    def routed(self) -> int:
        return self.tokens * self.top_k


@dataclass(frozen=True)
class WorkspaceLayout:
    """Byte offsets of the regions of the layer's workspace, and its size."""

    offsets: int  # int32 [E + 1]
    row_dest: int  # int32 [T·k]
    row_token: int  # int32 [T·k]
    row_scale: int  # fp32 [T·k]
    rows: int  # bf16 [T·k, H]: x gathered in routed order
    activated: int  # bf16 [T·k, I]
    slots: int  # bf16 [T, k, H]
    counters: int  # the two GEMMs' stream-K tile counters, side by side (zeroed by the gather kernel)
    counter_words: int
    gate_up_counters: int
    down_counters: int
    gate_up_partials: int
    down_partials: int
    nbytes: int


def workspace_layout(shape: LayerShape, gate_up_stream_k: tuple[int, int], down_stream_k: tuple[int, int]) -> WorkspaceLayout:
    """The regions one after another; ``*_stream_k`` = (counter bytes, partial bytes), (0, 0) without stream-K."""
    routed, e = shape.routed, shape.num_experts
    sizes = {
        "offsets": 4 * (e + 1), "row_dest": 4 * routed, "row_token": 4 * routed, "row_scale": 4 * routed,
        "rows": 2 * routed * shape.hidden, "activated": 2 * routed * shape.inter, "slots": 2 * routed * shape.hidden,
        "gate_up_counters": gate_up_stream_k[0], "down_counters": down_stream_k[0],
        "gate_up_partials": gate_up_stream_k[1], "down_partials": down_stream_k[1],
    }
    at, cursor = {}, 0
    for name, size in sizes.items():
        at[name] = cursor
        cursor += _align(size)
    counter_bytes = at["gate_up_partials"] - at["gate_up_counters"]
    return WorkspaceLayout(counters=at["gate_up_counters"], counter_words=counter_bytes // 4, nbytes=max(cursor, WORKSPACE_ALIGN),
                           **at)


@dataclass(frozen=True)
class GemmLaunch:
    """One grouped GEMM of the layer: kernel, grid and the numbers of its parameter block."""

    kernel: LoadedKernel
    grid: int
    n: int
    k: int
    num_experts: int
    n_atoms: int
    k_atoms: int
    out_cols: int
    stream_k: tuple[int, int]  # (counter bytes, partial bytes), (0, 0) without stream-K

    @property
    def launch_shape(self) -> "LaunchShape":
        k = self.kernel
        return LaunchShape(k.name, k.function_handle, self.grid, k.threads, k.shared_memory, PARAMS_SIZE)


def gemm_launch(config: TileConfig, device: torch.device, w_shape: tuple[int, ...], n: int, k: int, rows: int) -> GemmLaunch:
    """The launch of ``config`` on ``rows`` routed rows of a weight with ``PackedMXFP4.data`` shape ``w_shape``."""
    kernel = load(config, device)
    num_experts, n_atoms, k_atoms = w_shape[0], w_shape[1], w_shape[2]
    tiles = tile_bound(config, rows=rows, num_experts=num_experts, n=n, masked=False, max_m=0)
    grid = grid_size(config, kernel, tiles, k_atoms)
    stream_k = stream_k_sizes(config, grid, tiles, k_atoms)[1:] if config.stream_k else (0, 0)
    out_cols = n // 2 if config.epilogue == "swiglu" else n
    return GemmLaunch(kernel, grid, n, k, num_experts, n_atoms, k_atoms, out_cols, stream_k)


class LaunchShape(NamedTuple):
    name: str
    function: int
    grid: int
    threads: int
    shared_memory: int
    params_size: int


class LayerCall(NamedTuple):
    """One call's addresses and numbers (what the plan does not fix)."""

    x: int
    topk_ids: int
    topk_weights: int
    ids_int64: int
    weights_bf16: int
    gate_up: int  # PackedMXFP4.data
    gate_up_bias: int  # bf16 [E, 2I], or 0
    down: int
    down_bias: int  # bf16 [E, H], or 0
    alpha: float
    limit: float
    out: int  # bf16 [T, H]


@dataclass(frozen=True)
class MoePlan:
    shape: LayerShape
    layout: WorkspaceLayout
    gate_up: GemmLaunch
    down: GemmLaunch
    launches: tuple[LaunchShape, ...]  # the five, in order

    # Each pack_* writes one kernel's parameter block into ``buffer`` for a workspace at ``base``.
    def pack_routing(self, buffer, base: int, call: LayerCall) -> None:
        at, s = self.layout, self.shape
        _ROUTING.pack_into(buffer, 0, call.topk_ids, call.topk_weights, base + at.offsets, base + at.row_dest,
                           base + at.row_token, base + at.row_scale, s.routed, s.top_k, s.num_experts,
                           call.ids_int64, call.weights_bf16)

    def pack_gather(self, buffer, base: int, call: LayerCall) -> None:
        at, s = self.layout, self.shape
        zero = base + at.counters if at.counter_words else 0
        _GATHER.pack_into(buffer, 0, call.x, base + at.rows, base + at.row_token, base + at.offsets, zero,
                          at.counter_words, s.num_experts, 2 * s.hidden, int(call.x % 16 == 0))

    def pack_gate_up(self, buffer, base: int, call: LayerCall) -> None:
        at, g = self.layout, self.gate_up
        x_map = encode_x_map(base + at.rows, self.shape.routed, g.k, g.kernel.config.x_box_rows)
        _pack_gemm(buffer, g, x_map, call.gate_up, base + at.activated, base + at.offsets, self.shape.routed,
                   call.gate_up_bias, 0, 0, call.alpha, call.limit, base + at.gate_up_partials, base + at.gate_up_counters)

    def pack_down(self, buffer, base: int, call: LayerCall) -> None:
        at, g = self.layout, self.down
        x_map = encode_x_map(base + at.activated, self.shape.routed, g.k, g.kernel.config.x_box_rows)
        _pack_gemm(buffer, g, x_map, call.down, base + at.slots, base + at.offsets, self.shape.routed,
                   call.down_bias, base + at.row_scale, base + at.row_dest, _DOWN_ALPHA, _DOWN_LIMIT,
                   base + at.down_partials, base + at.down_counters)

    def pack_topk_sum(self, buffer, base: int, call: LayerCall) -> None:
        s = self.shape
        _SUM.pack_into(buffer, 0, base + self.layout.slots, call.out, s.tokens, s.top_k, s.hidden)

    def nodes(self) -> list[KernelNode]:
        """The five launches as graph nodes (their buffers still to be packed), in launch order."""
        return [KernelNode(*launch_shape) for launch_shape in self.launches]

    def packers(self) -> tuple:
        """The pack_* methods in launch order."""
        return (self.pack_routing, self.pack_gather, self.pack_gate_up, self.pack_down, self.pack_topk_sum)

    def run(self, stream: int, base: int, call: LayerCall) -> None:
        """Launch the five kernels on ``stream`` (their device current) with the workspace at ``base``."""
        buffer = params_buffer(PARAMS_SIZE)
        dependent = dependent_launch_enabled()
        for (name, function, grid, threads, shared, _), pack in zip(self.launches, self.packers()):
            pack(buffer, base, call)
            launch(function, grid, threads, shared, stream, name, dependent)


# _pack_gemm packs the grouped GEMM's block positionally, in this order (checked at import: a change to
# codegen/build/params.py must come here too, or the kernels would read shifted fields).
_GEMM_FIELDS = ("x_map", "w", "out", "rows", "num_experts", "n", "n_atoms", "k_atoms", "max_m", "total_rows",
                "masked", "rows_int64", "bias", "row_scale", "row_dest", "out_cols", "bias_stride", "alpha", "limit",
                "out_row_scale", "out_scale", "out_scale_inverse", "x_scale", "w_scale", "w_scale_stride", "workspace",
                "tile_counters")
_ROUTING_FIELDS = ("topk_ids", "topk_weights", "offsets", "row_dest", "row_token", "row_scale", "routed", "top_k",
                   "num_experts", "ids_int64", "weights_bf16")  # MoePlan.pack_routing's order, likewise
for _block, _packed, _where in ((PARAM_FIELDS, _GEMM_FIELDS, "codegen/build/params.py"),
                                (ROUTING_PARAMS.fields, _ROUTING_FIELDS, "codegen/runtime/routing.py")):
    if tuple(f.name for f in _block) != _packed:
        raise RuntimeError(f"codegen/runtime/moe_plan.py packs {_packed}, but {_where} declares "
                           f"{tuple(f.name for f in _block)}: update codegen/runtime/moe_plan.py's packers")


def _pack_gemm(buffer, g: GemmLaunch, x_map: bytes, w: int, out: int, offsets: int, rows: int, bias: int,
               row_scale: int, row_dest: int, alpha: float, limit: float, partials: int, counters: int) -> None:
    stream_k = g.stream_k != (0, 0)
    PARAMS_STRUCT.pack_into(
        buffer, 0, x_map, w, out, offsets, g.num_experts, g.n, g.n_atoms, g.k_atoms, 0, rows, 0, 0,
        bias, row_scale, row_dest, g.out_cols, g.n if bias else 0, alpha, limit,
        0, 0.0, 0.0,  # out_row_scale, out_scale, out_scale_inverse: the plan's activated rows are bf16
        0, 0, 0,  # x_scale, w_scale, w_scale_stride: the plan runs bf16 activations (W4A16)
        partials if stream_k else 0, counters if stream_k else 0,
    )


def make_plan(shape: LayerShape, device: torch.device, gate_up: tuple[TileConfig, tuple[int, ...]],
              down: tuple[TileConfig, tuple[int, ...]]) -> MoePlan:
    """The plan of one layer shape on ``device``: gate_up / down are (config, PackedMXFP4.data shape)."""
    routed = shape.routed
    gate_up_launch = gemm_launch(gate_up[0], device, gate_up[1], 2 * shape.inter, shape.hidden, routed)
    down_launch = gemm_launch(down[0], device, down[1], shape.hidden, shape.inter, routed)
    layout = workspace_layout(shape, gate_up_launch.stream_k, down_launch.stream_k)
    routing = routing_kernel(device, shape.num_experts)
    gather = moe_glue.glue_function(device, moe_glue.GATHER_ENTRY)
    topk_sum = moe_glue.glue_function(device, moe_glue.TOPK_SUM_ENTRY)
    launches = (
        LaunchShape("moe_routing", routing[0], 1, routing[1], routing[2], ROUTING_PARAMS.size),
        LaunchShape("moe_gather", gather, moe_glue.gather_grid(routed), moe_glue.GATHER_THREADS, 0,
                    moe_glue.GATHER_PARAMS.size),
        gate_up_launch.launch_shape,
        down_launch.launch_shape,
        LaunchShape("moe_topk_sum", topk_sum, moe_glue.topk_sum_grid(shape.tokens, shape.hidden),
                    moe_glue.TOPK_SUM_THREADS, 0, moe_glue.TOPK_SUM_PARAMS.size),
    )
    return MoePlan(shape, layout, gate_up_launch, down_launch, launches)
