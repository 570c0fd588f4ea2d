"""The paths the grouped-GEMM benchmark puts side by side, each on the same MXFP4 bytes:

* ``ours``: ``mxfp4.grouped_mm`` (its own path and config choice, as a user calls it);
* ``torch bf16``: ``torch._grouped_mm`` on the exact bf16 dequantization (a bf16 checkpoint's cost);
* ``humming``: humming-kernels 0.1.19 (the kernels behind vLLM's humming MoE backend), its
  ``gpt_oss_mxfp4`` weight schema loaded from our codes and scales, called as a grouped-contiguous
  GEMM with our ``offsets`` as its ``expert_layout`` and its whole default SM90 heuristic table.

Each ``prepare_*`` returns a :class:`Prepared` (a callable and the argument sets to rotate among so
that the weights are read from HBM, not L2) or raises :class:`Unavailable` with the reason.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

from codegen.tune.timing import rotation_sets

PATHS = ("ours", "humming", "torch bf16")
HUMMING_VERSION = "0.1.19"
GROUPED_CONTIGUOUS = "grouped_contiguous"


class Unavailable(Exception):
    """A peer that cannot run here (package missing, API mismatch); the message says why."""


@dataclass
class Operands:
    """One problem's inputs, shared by every path: x grouped by expert, the offsets, the weights."""

    packed: Any  # mxfp4.PackedMXFP4 [E, N, K]
    dequantized: torch.Tensor  # bf16 [E, N, K], exact
    x: torch.Tensor  # bf16 [T, K]
    offsets: torch.Tensor  # int32 [E + 1]
    read_bytes: int  # bytes one call must read (the row's arithmetic)
    l2_bytes: int
    budget: int  # bytes the rotation copies of one path may take


@dataclass
class Prepared:
    fn: Callable[..., torch.Tensor]
    arg_sets: list[tuple]
    note: str = ""


def copies_needed(read_bytes: int, copy_bytes: int, l2_bytes: int, budget: int) -> int:
    """Weight copies to rotate among: enough that the bytes a call reads exceed 2x L2, within budget."""
    wanted = rotation_sets(read_bytes, l2_bytes=l2_bytes, memory_budget=1 << 62)
    return int(max(1, min(wanted, budget // max(1, copy_bytes))))


def prepare_ours(ops: Operands) -> Prepared:
    import mxfp4

    w = ops.packed
    count = copies_needed(ops.read_bytes, w.data.numel(), ops.l2_bytes, ops.budget)
    weights = [w] + [mxfp4.PackedMXFP4(w.data.clone(), w.n, w.k) for _ in range(count - 1)]
    offsets = ops.offsets
    explained = mxfp4.explain(ops.x, w, offsets).splitlines()
    note = "; ".join(line.strip() for line in explained if line.strip().startswith(("path:", "config:")))
    return Prepared(lambda x, wi: mxfp4.grouped_mm(x, wi, offsets), [(ops.x, wi) for wi in weights], note)


def prepare_torch_bf16(ops: Operands) -> Prepared:
    """``torch._grouped_mm(x, W^T, offs=ends)``: the transposed view if torch takes it, else a copy."""
    if not hasattr(torch, "_grouped_mm"):
        raise Unavailable(f"torch {torch.__version__} has no torch._grouped_mm")
    ends = ops.offsets[1:].contiguous()
    fn = lambda x, wt: torch._grouped_mm(x, wt, offs=ends)  # noqa: E731
    count = copies_needed(ops.read_bytes * 4, ops.dequantized.numel() * 2, ops.l2_bytes, ops.budget)
    for layout in ("transposed view", "contiguous [E, K, N]"):
        make = (lambda w: w.transpose(1, 2)) if layout == "transposed view" else (lambda w: w.transpose(1, 2).contiguous())
        first = make(ops.dequantized)
        try:
            fn(ops.x, first)
            torch.cuda.synchronize()
        except RuntimeError as error:  # a layout this torch rejects: try the next
            last = error
            continue
        sets = [first] + [make(ops.dequantized.clone()) for _ in range(count - 1)]
        return Prepared(fn, [(ops.x, wt) for wt in sets], f"weights as a {layout}")
    raise Unavailable(f"torch._grouped_mm rejects both layouts: {last}")


# ---------------------------------------------------------------------------------------------
# humming


def humming_unavailable() -> str | None:
    """None when humming-kernels imports; else the reason, for a "humming unavailable: why" line."""
    try:
        import humming  # noqa: F401
        from humming.layer import HummingLayer  # noqa: F401
        from humming.tune import get_heuristics_config  # noqa: F401
    except Exception as error:  # ImportError, or a broken install (missing CUDA_HOME, packaging, ...)
        return (f"{type(error).__name__}: {error}".splitlines()[0]
                + f" (pip install 'humming-kernels=={HUMMING_VERSION}'; it needs CUDA_HOME)")
    return None


def humming_version() -> str:
    import humming

    return str(getattr(humming, "__version__", "unknown"))


def gpt_oss_tensors(packed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Our packed weight back in gpt-oss's checkpoint bytes: blocks ``[E, N, K/2]``, scales ``[E, N, K/32]``."""
    from mxfp4.format.layout import unpack_experts

    e, n, k = packed.num_experts, packed.n, packed.k
    blocks = torch.empty((e, n, k // 2), dtype=torch.uint8, device=packed.data.device)
    scales = torch.empty((e, n, k // 32), dtype=torch.uint8, device=packed.data.device)
    step = max(1, (1 << 27) // max(1, n * k))  # bounded temporaries
    for e0 in range(0, e, step):
        part = unpack_experts(packed, e0, min(e, e0 + step))
        blocks[e0 : e0 + part.blocks.shape[0]] = part.blocks.reshape(-1, n, k // 2)
        scales[e0 : e0 + part.scales.shape[0]] = part.scales
    return blocks, scales


def humming_layer(packed: Any) -> Any:
    """A transformed ``HummingLayer`` holding ``packed``'s bytes in the ``gpt_oss_mxfp4`` schema."""
    from humming.layer import HummingLayer

    device = packed.data.device
    blocks, scales = gpt_oss_tensors(packed)
    with torch.device(device):  # its parameters are created with torch.empty: make them on the GPU
        layer = HummingLayer(shape_n=packed.n, shape_k=packed.k, weight_config={"quant_method": "gpt_oss_mxfp4"},
                             num_experts=packed.num_experts, pad_n_to_multiple=256, pad_k_to_multiple=128,
                             torch_dtype=torch.bfloat16)
    layer = layer.to(device)
    layer.load_from_tensors({"weight": blocks, "weight_scale": scales})
    layer.transform()
    return layer


def humming_configs(layer: Any) -> tuple[str, str]:
    """(compute_config, tuning_config) JSON strings: grouped-contiguous, its whole SM90 heuristic table.

    The whole table, because a table that does not cover the call's rows fails at launch.
    """
    from humming.tune import get_heuristics_config

    table = get_heuristics_config(layer.humming_config, gemm_type=GROUPED_CONTIGUOUS)
    return json.dumps({"gemm_type": GROUPED_CONTIGUOUS}), json.dumps(table)


def humming_call(offsets: torch.Tensor, configs: tuple[str, str]) -> Callable[..., torch.Tensor]:
    """``fn(x, layer)``: one grouped-contiguous GEMM, our offsets as humming's expert layout."""
    compute, tuning = configs
    return lambda x, layer: layer(x, expert_layout=offsets, compute_config=compute, tuning_config=tuning)


def prepare_humming(ops: Operands, layer: Any = None) -> Prepared:
    """humming on our bytes; ``layer`` (a transformed HummingLayer of the same weight) is reused if given."""
    reason = humming_unavailable()
    if reason:
        raise Unavailable(reason)
    layer = layer if layer is not None else humming_layer(ops.packed)
    configs = humming_configs(layer)
    copy_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    count = copies_needed(ops.read_bytes, copy_bytes, ops.l2_bytes, ops.budget)
    layers = [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]
    return Prepared(humming_call(ops.offsets, configs), [(ops.x, lay) for lay in layers], f"humming {humming_version()}, grouped_contiguous")


PREPARE: dict[str, Callable[[Operands], Prepared]] = {
    "ours": prepare_ours,
    "torch bf16": prepare_torch_bf16,
    "humming": prepare_humming,
}
