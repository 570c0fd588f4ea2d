"""The gpt-oss expert layer on SM90 with the work fused into the generated kernels.

Five kernels, planned once per shape (codegen.runtime.moe_plan) in one workspace: the routing kernel groups the
T·k choices by expert on the device (codegen.runtime.routing); the gather kernel copies x's rows into that order;
the gate_up kernel's epilogue adds the bias and applies the clamped SwiGLU (its weight rows paired at pack
time, ``mxfp4.format.gate_up``), writing bf16 ``[T·k, I]``; the down kernel's epilogue adds the bias, multiplies
by the routing weight and writes each row to its token's slot, ``[T, k, H]``; the top-k sum kernel adds
each token's k slots in slot order in fp32 (codegen.runtime.moe_glue). No host sync, no atomics: calls are
bitwise identical, and the layer captures into a CUDA graph for a fixed T.

A call allocates its workspace and its output and makes no other torch op. A plain eager call at small T
replays the five kernels as one CUDA graph instead (mxfp4.experts.graphs: the same kernels and parameters,
so the same bits), which takes the host cost of five launches down to one.

``activations="fp8"`` and expert parallelism's foreign ids take their own launches (mxfp4.experts.fused_steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from functools import lru_cache

import torch

from codegen.build.config import TileConfig
from codegen.runtime.moe_plan import (  # this module is imported on the SM90 path only
    LayerCall,
    LayerShape,
    make_plan,
)
from mxfp4.format.gate_up import PackedGateUp
from mxfp4.format.layout import ATOM_BYTES, ATOM_K, ATOM_N, PackedMXFP4
from mxfp4.format.layout_fp8 import PackedMXFP4FP8
from mxfp4.ops.dispatch import choose_config

from . import graphs as moe_graphs


def fused_config(w: PackedMXFP4 | PackedMXFP4FP8, rows: int, epilogue: str, device_name: str | None) -> TileConfig:
    """The tuned (or heuristic) config of this GEMM shape with ``epilogue``, of the weight's family (W4A8 for the
    FP8-ready layout): the epilogue runs once per tile after the K loop, so the best plain-GEMM config is the
    fused kernel's too."""
    activations = "fp8" if isinstance(w, PackedMXFP4FP8) else "bf16"
    return _config(w.num_experts, w.n, w.k, rows, epilogue, device_name, activations)


def _config(num_experts: int, n: int, k: int, rows: int, epilogue: str, device_name: str | None,
            activations: str = "bf16") -> TileConfig:
    """The chosen config for ``rows`` routed rows (:func:`_fused_config`), or the one :func:`forced_tile_config`
    forces."""
    if _forced is not None:
        return dataclasses.replace(_forced, epilogue=epilogue)
    return _fused_config(num_experts, n, k, rows, epilogue, device_name, activations)


_forced: TileConfig | None = None  # forced_tile_config's config


@contextlib.contextmanager
def forced_tile_config(config: TileConfig) -> Iterator[None]:
    """Inside, every layer call runs ``config`` on both GEMMs (its epilogue swapped for each GEMM's), launch by
    launch: how the sanitizer and the tests put one tile config through the fused epilogues. The plans and the
    graph replay are reset on the way in and out, so no plan or graph made with another config is served. Not
    for concurrent use."""
    global _forced
    moe_graphs.set_moe_graphs(False)
    clear_plans()  # plans hold the configs they were made with
    _forced = config
    try:
        yield
    finally:
        _forced = None
        clear_plans()
        moe_graphs.set_moe_graphs(None)


@lru_cache(maxsize=1024)  # per call: keep it a dict lookup
def _fused_config(num_experts: int, n: int, k: int, rows: int, epilogue: str, device_name: str | None,
                  activations: str = "bf16") -> TileConfig:
    # The layer knows its rows (T x top_k): the selection may fit the grid to the experts they can reach.
    chosen = choose_config(num_experts, n, k, -(-rows // num_experts), device_name, activations, rows).config
    return dataclasses.replace(chosen, epilogue=epilogue)


def _data_shape(num_experts: int, n: int, k: int) -> tuple[int, int, int, int]:
    """``PackedMXFP4.data``'s shape for an [E, N, K] weight."""
    return (num_experts, -(-n // ATOM_N), -(-k // ATOM_K), ATOM_BYTES)


_plans: dict[tuple, object] = {}  # layer_plan's arguments -> MoePlan
_PLANS_LIMIT = 256


def layer_plan(device_index: int, device_name: str | None, tokens: int, top_k: int, num_experts: int,
               hidden: int, inter: int):
    """The launches of the layer for T = ``tokens``, top-``top_k``, E experts, H = ``hidden``, I = ``inter``
    (made once per shape; a call looks it up in a dict)."""
    key = (device_index, device_name, tokens, top_k, num_experts, hidden, inter)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _PLANS_LIMIT:
            _plans.clear()
        plan = _plans[key] = _make_layer_plan(*key)
    return plan


def clear_plans() -> None:
    """Forget the plans (tests that stand in for the device make theirs with fake kernels)."""
    _plans.clear()


def _make_layer_plan(device_index: int, device_name: str | None, tokens: int, top_k: int, num_experts: int,
                     hidden: int, inter: int):
    routed, device = tokens * top_k, torch.device("cuda", device_index)
    gate_up = _config(num_experts, 2 * inter, hidden, routed, "swiglu", device_name)
    down = _config(num_experts, hidden, inter, routed, "scatter", device_name)
    return make_plan(LayerShape(tokens, top_k, num_experts, hidden, inter), device,
                     (gate_up, _data_shape(num_experts, 2 * inter, hidden)), (down, _data_shape(num_experts, hidden, inter)))


def _bf16_bias(bias: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """(the bias as the kernels read it: bf16, contiguous; whether that is the caller's tensor itself)."""
    if bias is None:
        return None, True
    if bias.dtype == torch.bfloat16 and bias.is_contiguous():
        return bias, True
    return bias.to(torch.bfloat16).contiguous(), False


def moe_sm90(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: PackedGateUp, down: PackedMXFP4,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, alpha: float, limit: float,
    device_name: str | None, *, may_replay: bool = False,
) -> torch.Tensor:
    """``mxfp4.moe`` on SM90 (inputs validated by the op). ``may_replay``: a plain eager call (no capture
    check yet), which may run as a graph replay."""
    tokens, top_k = topk_ids.shape
    index = x.device.index
    plan_key = (index, device_name, tokens, top_k, gate_up.num_experts, down.n, down.k)
    plan = _plans.get(plan_key) or layer_plan(*plan_key)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    weights = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    (gate_up_bias, gate_up_own), (down_bias, down_own) = _bf16_bias(gate_up_bias), _bf16_bias(down_bias)
    out = torch.empty_like(x)  # [T, H] bf16, like x (H = down.n, checked)
    call = LayerCall(
        x.data_ptr(), ids.data_ptr(), weights.data_ptr(), int(ids.dtype == torch.int64),
        int(weights.dtype == torch.bfloat16), gate_up.data.data_ptr(), _address(gate_up_bias), down.data.data_ptr(),
        _address(down_bias), alpha, limit, out.data_ptr(),
    )
    on_device = current_device() == index
    if may_replay and on_device and gate_up_own and down_own and _replays(tokens):
        owners = (gate_up.data, down.data, gate_up_bias, down_bias)
        if moe_graphs.replay(plan, plan_key, call, current_stream(index), x, owners):
            return out
    if on_device:
        _launch(plan, call, x, index)
    else:
        with torch.cuda.device(index):
            _launch(plan, call, x, index)
    return out


# torch's CUDA state, one function each (CPU tests stand in for them).
def current_device() -> int:
    return torch._C._cuda_getDevice()


def current_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def capturing() -> bool:
    return torch._C._cuda_isCurrentStreamCapturing()


def _replays(tokens: int) -> bool:
    """Whether this call may replay a graph: small T, replay on, and no capture of the current stream."""
    return tokens <= moe_graphs.GRAPH_MAX_TOKENS and moe_graphs.moe_graphs_enabled() and not capturing()


def _launch(plan, call, x: torch.Tensor, index: int) -> None:
    """The five kernels one by one on the current stream, with a fresh workspace from torch's allocator."""
    workspace = x.new_empty(plan.layout.nbytes // 2)  # bf16 elements; freed in stream order after the launches
    plan.run(current_stream(index), workspace.data_ptr(), call)


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
