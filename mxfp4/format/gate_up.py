"""gate_up weights with each gate row paired with its up row, for the fused SwiGLU epilogue.

gpt-oss stores ``gate_up_proj`` as ``[E, 2I, H]`` with gate and up interleaved: row ``2c`` is the gate
row of channel ``c`` and row ``2c + 1`` its up row. A WGMMA accumulator thread holds weight rows
``r`` and ``r + 8`` of every 16-row block, so the kernel's SwiGLU epilogue (templates/mxfp4_epilogue.cuh)
wants, in each block ``b`` of 16 rows, the gate rows of channels ``8b .. 8b + 7`` first and then their
up rows::

    paired row 16 b + j      = interleaved row 16 b + 2 j        (gate of channel 8 b + j), j < 8
    paired row 16 b + 8 + j  = interleaved row 16 b + 2 j + 1    (up of channel 8 b + j)

The permutation stays inside each 16-row block, so 2I must be a multiple of 16 (gpt-oss: 5760).
:class:`PackedGateUp` marks a packed weight whose rows are in this order; everything that reads its
rows (the portable path, the references, unpacking) goes through :func:`unpack_gate_up` or
:func:`split_gate_up`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import PackedMXFP4, pack, unpack
from .layout_fp8 import PackedMXFP4FP8, pack_fp8, unpack_fp8
from .tensor import MXFP4Tensor

PAIR_BLOCK = 16  # rows per pairing block: 8 gate rows, then their 8 up rows
PAIR_CHANNELS = PAIR_BLOCK // 2


@dataclass(frozen=True)
class PackedGateUp(PackedMXFP4):
    """A packed ``[E, 2I, H]`` gate_up weight whose rows are paired (see the module docstring).

    Like any PackedMXFP4, ``grouped_mm`` and ``unpack`` see the rows as stored (paired order);
    :func:`unpack_gate_up` gives the checkpoint's interleaved order back.
    """

    def to(self, device: torch.device | str) -> "PackedGateUp":
        return PackedGateUp(self.data.to(device), self.n, self.k)


@dataclass(frozen=True, repr=False)
class PackedGateUpFP8(PackedMXFP4FP8):
    """:class:`PackedGateUp` in the FP8-ready layout (``pack_gate_up(w, activations="fp8")``): paired rows."""


def is_paired(w: object) -> bool:
    """Whether ``w`` is a gate_up weight with paired rows (either layout)."""
    return isinstance(w, (PackedGateUp, PackedGateUpFP8))


def pairable(rows: int) -> bool:
    """Whether a gate_up weight of ``rows`` (= 2I) rows can be paired (I a multiple of 8)."""
    return rows % PAIR_BLOCK == 0


def pack_for_moe(w: MXFP4Tensor) -> PackedMXFP4:
    """A gate_up weight packed for ``mxfp4.moe``: paired (fused kernels) when 2I allows, else as is."""
    return pack_gate_up(w) if pairable(w.blocks.shape[1]) else pack(w)


def paired_row_source(rows: int) -> torch.Tensor:
    """For each paired row, the interleaved row it holds (int64 ``[rows]``)."""
    if not pairable(rows):
        raise ValueError(f"gate_up has {rows} rows; pairing needs a multiple of {PAIR_BLOCK} (2I with I a multiple of 8)")
    j = torch.arange(rows) % PAIR_BLOCK
    return torch.arange(rows) - j + 2 * (j % PAIR_CHANNELS) + j // PAIR_CHANNELS


def pack_gate_up(w: MXFP4Tensor, *, activations: str = "bf16") -> PackedGateUp | PackedGateUpFP8:
    """``mxfp4.pack`` of an interleaved ``[E, 2I, H]`` gate_up weight, rows paired for the fused kernel;
    ``activations="fp8"``: in the FP8-ready layout (``mxfp4.pack(w, activations="fp8")``)."""
    if not isinstance(w, MXFP4Tensor) or w.blocks.dim() != 4:
        raise TypeError(f"pack_gate_up: w must be an MXFP4Tensor of shape [E, 2I, H], got {type(w).__name__}")
    if activations not in ("bf16", "fp8"):
        raise ValueError(f"pack_gate_up: activations must be 'bf16' or 'fp8', got {activations!r}")
    source = paired_row_source(w.blocks.shape[1]).to(w.blocks.device)
    paired = MXFP4Tensor(w.blocks.index_select(1, source), w.scales.index_select(1, source))
    if activations == "fp8":
        packed = pack_fp8(paired)
        return PackedGateUpFP8(packed.data, packed.row_scale, packed.n, packed.k, packed.rerounded_blocks,
                               packed.total_blocks)
    packed = pack(paired)
    return PackedGateUp(packed.data, packed.n, packed.k)


def unpack_gate_up(packed: PackedGateUp | PackedGateUpFP8) -> MXFP4Tensor:
    """The interleaved ``[E, 2I, H]`` weight back from a :class:`PackedGateUp` (exact) or a
    :class:`PackedGateUpFP8` (as it holds it)."""
    paired = unpack_fp8(packed) if isinstance(packed, PackedGateUpFP8) else unpack(packed)
    target = torch.argsort(paired_row_source(packed.n)).to(paired.blocks.device)
    return MXFP4Tensor(paired.blocks.index_select(1, target), paired.scales.index_select(1, target))


def split_gate_up(h: torch.Tensor, paired: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) ``[..., I]`` from a gate_up product ``[..., 2I]`` in paired or interleaved column order."""
    if not paired:
        return h[..., 0::2], h[..., 1::2]
    blocks = h.unflatten(-1, (-1, 2, PAIR_CHANNELS))
    return blocks[..., 0, :].flatten(-2), blocks[..., 1, :].flatten(-2)
