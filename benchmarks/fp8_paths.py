"""The paths the FP8 suite (``bench fp8``) puts side by side, all on the same MXFP4 weight values:

* ``W4A16``: ``mxfp4.grouped_mm`` on bf16 x and ``mxfp4.pack`` weights (our bf16-activation kernels);
* ``W4A8``: ``mxfp4.grouped_mm`` on e4m3 x (``mxfp4.quantize_activations``, not timed) and the FP8-ready
  layout (``mxfp4.pack(w, activations="fp8")``);
* ``W4A8+quantize``: the same with the quantizer in the timed call (what a bf16 caller pays);
* ``torch fp8``: ``torch._scaled_grouped_mm`` on FP8 e4m3 weights of the same shape (twice our bytes) with
  rowwise scales, on the same e4m3 x; its weight scales are powers of two, so its e4m3 weights hold the
  MXFP4 values exactly and it computes the same product;
* ``torch bf16``: ``torch._grouped_mm`` on the bf16 dequantization;
* ``humming fp8``: humming-kernels 0.1.19 with its FP8 input schema (``input_config={"quant_method": "fp8"}``:
  dynamic per-token e4m3, its own quantizer inside the call) on the ``gpt_oss_mxfp4`` weights.

Each ``prepare_*`` returns a ``peers.Prepared`` (a callable and argument sets rotated past the L2) or raises
``peers.Unavailable`` with the reason. ``REFERENCE`` says which float64 reference each path is checked
against: the bf16 x, or the e4m3 x with its row scales.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import peers

PATHS = ("W4A16", "W4A8", "W4A8+quantize", "torch fp8", "torch bf16", "humming fp8")
REFERENCE = {"W4A16": "bf16", "W4A8": "fp8", "W4A8+quantize": "fp8", "torch fp8": "fp8", "torch bf16": "bf16",
             "humming fp8": "bf16"}
# Against float64 on the same e4m3 x: the kernels' own error (bf16 rounding of the output). humming quantizes
# x itself, so it is checked against the bf16-x reference with the FP8 layer's budget.
TOLERANCE = {"bf16": 1e-2, "fp8": 1e-2, "humming fp8": 5e-2}


@dataclass
class Weights:
    """One shape's weight in every form a path reads (built once per shape)."""

    plain: Any  # mxfp4.PackedMXFP4
    ready: Any  # mxfp4.PackedMXFP4FP8 (the same MXFP4 values)
    dequantized: torch.Tensor  # bf16 [E, N, K], exact
    fp8: torch.Tensor  # e4m3 [E, N, K] for torch._scaled_grouped_mm
    fp8_scale: torch.Tensor  # float32 [E, N], powers of two
    humming: Any = None  # a transformed HummingLayer with the FP8 input schema, or None


@dataclass
class Operands:
    """One row's inputs: x in bf16 and in e4m3 with its row scales, the offsets, and the rotation budget."""

    weights: Weights
    x: torch.Tensor
    x_fp8: torch.Tensor
    x_scale: torch.Tensor
    offsets: torch.Tensor
    read_bytes: int
    l2_bytes: int
    budget: int


def torch_fp8_weights(dequantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 ``[E, N, K]`` and float32 ``[E, N]`` row scales with ``e4m3 * scale == dequantized`` wherever the row's
    values span less than e4m3's range: each scale is the power of two that puts the row's largest value at or
    below 448 (MXFP4 values have 2 significant bits, e4m3 keeps 4). A few experts at a time."""
    e, n, k = dequantized.shape
    out = torch.empty((e, n, k), dtype=torch.float8_e4m3fn, device=dequantized.device)
    scale = torch.empty((e, n), dtype=torch.float32, device=dequantized.device)
    step = max(1, (1 << 26) // max(1, n * k))
    for e0 in range(0, e, step):
        rows = dequantized[e0:e0 + step].float()
        amax = rows.abs().amax(dim=-1)
        power = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / 448.0))), torch.ones_like(amax))
        out[e0:e0 + step] = (rows / power.unsqueeze(-1)).to(torch.float8_e4m3fn)
        scale[e0:e0 + step] = power
    return out, scale


def _rotated(ops: Operands, copy_bytes: int) -> int:
    return peers.copies_needed(ops.read_bytes, copy_bytes, ops.l2_bytes, ops.budget)


def _forced_note(config: str) -> str:
    return f"config: {config} (forced)"


def prepare_w4a16(ops: Operands, config: str | None = None) -> peers.Prepared:
    """Our W4A16 on the bf16 x; ``config`` forces a tile config (None: the table's pick)."""
    import mxfp4

    w = ops.weights.plain
    offsets = ops.offsets
    note = _forced_note(config) if config else _config_note(ops.x, w, offsets)
    fn = lambda x, wi: mxfp4.grouped_mm(x, wi, offsets, config=config)  # noqa: E731
    return peers.Prepared(fn, [(ops.x, wi) for wi in _plain_copies(ops)], note)


def _plain_copies(ops: Operands) -> list:
    import mxfp4

    w = ops.weights.plain
    return [w] + [mxfp4.PackedMXFP4(w.data.clone(), w.n, w.k) for _ in range(_rotated(ops, w.data.numel()) - 1)]


def _ready_copies(ops: Operands) -> list:
    import mxfp4

    w = ops.weights.ready
    count = _rotated(ops, w.data.numel())
    return [w] + [mxfp4.PackedMXFP4FP8(w.data.clone(), w.row_scale.clone(), w.n, w.k) for _ in range(count - 1)]


def prepare_w4a8(ops: Operands, config: str | None = None) -> peers.Prepared:
    """Our W4A8 on the e4m3 x; ``config`` forces a tile config (None: the table's pick)."""
    import mxfp4

    offsets = ops.offsets
    fn = lambda x, wi, s: mxfp4.grouped_mm(x, wi, offsets, config=config, x_scale=s)  # noqa: E731
    note = _forced_note(config) if config else _config_note(ops.x_fp8, ops.weights.ready, offsets, ops.x_scale)
    return peers.Prepared(fn, [(ops.x_fp8, wi, ops.x_scale) for wi in _ready_copies(ops)], note)


def prepare_forced(config: str) -> Callable[[Operands], peers.Prepared]:
    """W4A16 (a bf16 config) or W4A8 (an ``_fp8`` one) with ``config`` forced, not the table's pick: one tile
    config profiled beside another (``bench ncu-case --prefill --configs``). A ``_swiglu`` or ``_scatter`` config
    (the MoE layer's gate_up and down epilogues, no bias) is launched directly, as its roof builds are."""
    from codegen.build.config import TileConfig

    tile = TileConfig.from_name(config)  # ValueError naming a malformed config
    if tile.epilogue != "store":
        return functools.partial(_prepare_roof, tile, "none (shipped)", {})
    return functools.partial(prepare_w4a8 if tile.activations == "fp8" else prepare_w4a16, config=config)


# The roof builds `bench ncu-case --mma-roof` profiles after each forced config: (what it leaves out, launch.load's
# diagnostic flags). Their outputs are not the product.
ROOF_BUILDS = (
    ("no decode", {"no_decode": True}),      # templates/mxfp4_no_decode.cuh: the code words go into the WGMMAs
    ("no epilogue", {"no_epilogue": True}),  # templates/mxfp4_no_epilogue.cuh: no row scales, no stores
    ("no decode, no epilogue", {"no_decode": True, "no_epilogue": True}),  # the pipeline and the tensor cores
    ("coalesced stores", {"coalesced_stores": True}),  # templates/mxfp4_coalesced_stores.cuh: whole-line stores
    # Not a roof: the epilogue before the sector and line stores (the same output), timed beside them.
    ("paired stores (before)", {"paired_stores": True}),  # templates/mxfp4_epilogue.cuh: paired_stores_build
)
# Candidates for a swiglu config (the MoE layer's gate_up), timed the same way (`--mma-roof` on an ``_swiglu`` name).
SWIGLU_ROOF_BUILDS = (
    ("swiglu line stores (candidate)", {"swiglu_lines": True}),  # templates/mxfp4_line_stores.cuh
)


def roof_builds(config: str, only: frozenset[str] | None = None) -> tuple[tuple[str, dict[str, bool]], ...]:
    """The builds ``--mma-roof`` profiles after ``config``: ROOF_BUILDS (a scatter config without the coalesced stores,
    which only Store has), or SWIGLU_ROOF_BUILDS for a swiglu one; with ``only`` (``--roofs``), those whose every
    launch.load flag is in it."""
    from codegen.build.config import TileConfig

    tile = TileConfig.from_name(config)  # ValueError naming a malformed config
    if tile.epilogue == "swiglu":
        builds = SWIGLU_ROOF_BUILDS
    else:
        builds = tuple(build for build in ROOF_BUILDS if tile.epilogue == "store" or "coalesced_stores" not in build[1])
    return tuple(build for build in builds if only is None or set(build[1]) <= only)


def prepare_roof(config: str, leaves_out: str) -> Callable[[Operands], peers.Prepared]:
    """``config`` forced, in the roof build of roof_builds(config) named ``leaves_out``: what the pipeline and the
    tensor cores cost without that part, profiled beside the shipped build (``bench ncu-case --prefill --configs ...
    --mma-roof``)."""
    from codegen.build.config import TileConfig

    flags = dict(roof_builds(config))[leaves_out]  # KeyError: not a roof build of this config
    return functools.partial(_prepare_roof, TileConfig.from_name(config), leaves_out, flags)  # ValueError: malformed


def _prepare_roof(config: Any, leaves_out: str, flags: dict[str, bool], ops: Operands) -> peers.Prepared:
    from codegen.runtime import launch

    fp8 = config.activations == "fp8"
    x, copies = (ops.x_fp8, _ready_copies(ops)) if fp8 else (ops.x, _plain_copies(ops))
    kernel = launch.load(config, x.device, **flags)
    columns = copies[0].n // 2 if config.epilogue == "swiglu" else copies[0].n  # SwiGLU: gate/up pairs
    out = torch.empty((x.shape[0], columns), dtype=torch.bfloat16, device=x.device)
    row_dest = row_scale = None
    if config.epilogue == "scatter":  # the layer's down: each row to a token's slot, times its routing weight
        generator = torch.Generator().manual_seed(0)
        row_dest = torch.randperm(x.shape[0], generator=generator).to(x.device, torch.int32)
        row_scale = torch.rand(x.shape[0], generator=generator).to(x.device)
    epilogue = launch.EpilogueArgs(row_scale=row_scale, row_dest=row_dest, x_scale=ops.x_scale if fp8 else None,
                                   w_scale=copies[0].row_scale if fp8 else None)

    def fn(xi: torch.Tensor, wi: Any) -> torch.Tensor:
        launch.grouped_mm_sm90(xi, wi.data, wi.n, wi.k, ops.offsets, False, config, out, epilogue, kernel=kernel)
        return out

    return peers.Prepared(fn, [(x, wi) for wi in copies], f"config: {config.name} (forced), roof: {leaves_out}")


def prepare_w4a8_quantize(ops: Operands) -> peers.Prepared:
    import mxfp4

    offsets = ops.offsets

    def fn(x: torch.Tensor, wi: Any) -> torch.Tensor:
        x_fp8, x_scale = mxfp4.quantize_activations(x)
        return mxfp4.grouped_mm(x_fp8, wi, offsets, x_scale=x_scale)

    note = "quantize_activations + W4A8; " + _config_note(ops.x_fp8, ops.weights.ready, offsets, ops.x_scale)
    return peers.Prepared(fn, [(ops.x, wi) for wi in _ready_copies(ops)], note)


def prepare_torch_fp8(ops: Operands) -> peers.Prepared:
    """``torch._scaled_grouped_mm(x_fp8, W_fp8^T, x_scale, w_scale, offs=ends)``: rowwise scales, bf16 out."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        raise peers.Unavailable(f"torch {torch.__version__} has no torch._scaled_grouped_mm")
    ends = ops.offsets[1:].contiguous()
    w8, scale = ops.weights.fp8, ops.weights.fp8_scale
    count = _rotated(ops, w8.numel())
    sets = [(ops.x_fp8, w8, scale)] + [(ops.x_fp8, w8.clone(), scale.clone()) for _ in range(count - 1)]

    def fn(x: torch.Tensor, wi: torch.Tensor, si: torch.Tensor) -> torch.Tensor:
        return torch._scaled_grouped_mm(x, wi.transpose(1, 2), ops.x_scale, si, offs=ends, out_dtype=torch.bfloat16)

    return peers.Prepared(fn, sets, "e4m3 weights [E, N, K] (2x our bytes), rowwise scales, default accumulation")


def prepare_torch_bf16(ops: Operands) -> peers.Prepared:
    grouped = peers.Operands(ops.weights.plain, ops.weights.dequantized, ops.x, ops.offsets, ops.read_bytes,
                             ops.l2_bytes, ops.budget)
    return peers.prepare_torch_bf16(grouped)


def humming_fp8_layer(packed: Any) -> Any:
    """A transformed ``HummingLayer``: our weight's bytes in the ``gpt_oss_mxfp4`` schema, FP8 input schema."""
    from humming.layer import HummingLayer

    device = packed.data.device
    blocks, scales = peers.gpt_oss_tensors(packed)
    with torch.device(device):
        layer = HummingLayer(shape_n=packed.n, shape_k=packed.k, weight_config={"quant_method": "gpt_oss_mxfp4"},
                             input_config={"quant_method": "fp8"}, num_experts=packed.num_experts,
                             pad_n_to_multiple=256, pad_k_to_multiple=128, torch_dtype=torch.bfloat16)
    layer = layer.to(device)
    layer.load_from_tensors({"weight": blocks, "weight_scale": scales})
    layer.transform()
    return layer


def prepare_humming_fp8(ops: Operands) -> peers.Prepared:
    reason = peers.humming_unavailable()
    if reason:
        raise peers.Unavailable(reason)
    layer = ops.weights.humming if ops.weights.humming is not None else humming_fp8_layer(ops.weights.plain)
    configs = peers.humming_configs(layer)
    copy_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    layers = [layer] + [copy.deepcopy(layer) for _ in range(_rotated(ops, copy_bytes) - 1)]
    return peers.Prepared(peers.humming_call(ops.offsets, configs), [(ops.x, lay) for lay in layers],
                          f"humming {peers.humming_version()}, FP8 input schema (dynamic per token), grouped_contiguous")


def _config_note(x: torch.Tensor, w: Any, offsets: torch.Tensor, x_scale: torch.Tensor | None = None) -> str:
    """explain's path and config lines for the call (e4m3 x with its x_scale, as the call takes it)."""
    import mxfp4

    lines = mxfp4.explain(x, w, offsets, x_scale=x_scale).splitlines()
    return "; ".join(line.strip() for line in lines if line.strip().startswith(("path:", "config:")))


PREPARE = {
    "W4A16": prepare_w4a16,
    "W4A8": prepare_w4a8,
    "W4A8+quantize": prepare_w4a8_quantize,
    "torch fp8": prepare_torch_fp8,
    "torch bf16": prepare_torch_bf16,
    "humming fp8": prepare_humming_fp8,
}
