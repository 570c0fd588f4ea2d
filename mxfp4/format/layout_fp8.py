"""The FP8-ready packed layout: ``mxfp4.pack(w, activations="fp8")`` builds it, ``unpack_fp8`` reads it back.

The contract (atoms, where each code bit and block byte goes, the row scales, the re-rounding rule) is
written down in :mod:`mxfp4.format.layout`'s docstring, section "The FP8-ready layout", with the constants the
kernel's decode renders; this module implements it with vectorized torch ops on the weight's device, a
bounded number of experts at a time, like :func:`mxfp4.format.layout.pack`.

Same bytes as the plain layout (4 bits per code, one byte per 32-block, padding to 64 x 64 atoms), plus
``row_scale`` (4 bytes per weight row). The layout is lossless except for re-rounded blocks (blocks more
than 2^11 below their row's largest; ``rerounded_blocks`` counts them): ``unpack_fp8`` then gives the
re-rounded weight, whose values the W4A8 kernels multiply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .codec import E8M0_BIAS, E8M0_NAN, e2m1_magnitude_codes
from .layout import (
    ATOM_BYTES,
    ATOM_CODE_BYTES,
    ATOM_K,
    ATOM_N,
    FP8_CODE_BITS,
    FP8_MAX_OFFSET,
    FP8_OFFSET_STEP,
    FP8_WEIGHT_SHIFT,
    PackedGeometry,
    _code_sources,
    _experts_per_chunk,
    _gather_code_bits,
    _round_up,
    _scale_source,
    _spread_code_bits,
    fp8_code_position,
)
from .tensor import BLOCK_SIZE, E2M1_VALUES, MXFP4Tensor, describe_bytes


@dataclass(frozen=True, repr=False)
class PackedMXFP4FP8(PackedGeometry):
    """An MXFP4 weight ``[E, N, K]`` in the FP8-ready layout (``mxfp4.pack(w, activations="fp8")``).

    ``data``: uint8 ``[E, N/64, K/64, ATOM_BYTES]`` (codes and block offsets); ``row_scale``: float32
    ``[E, N/64 * 64]``; ``rerounded_blocks``: blocks of the source weight re-rounded at pack time (see
    :mod:`mxfp4.format.layout`); ``total_blocks``: ``E * N * K / 32``.
    """

    data: torch.Tensor
    row_scale: torch.Tensor
    n: int
    k: int
    rerounded_blocks: int = 0
    total_blocks: int = field(default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.uint8:
            raise TypeError("PackedMXFP4FP8.data must be a uint8 torch.Tensor")
        if not isinstance(self.row_scale, torch.Tensor) or self.row_scale.dtype != torch.float32:
            raise TypeError("PackedMXFP4FP8.row_scale must be a float32 torch.Tensor")
        self._check_sizes()
        atoms = (_round_up(self.n, ATOM_N) // ATOM_N, _round_up(self.k, ATOM_K) // ATOM_K, ATOM_BYTES)
        if self.data.dim() != 4 or tuple(self.data.shape[1:]) != atoms or not self.data.is_contiguous():
            raise ValueError(f"PackedMXFP4FP8.data must be contiguous [E, {atoms[0]}, {atoms[1]}, {atoms[2]}] for "
                             f"N={self.n}, K={self.k}; got {tuple(self.data.shape)}")
        rows = (self.data.shape[0], atoms[0] * ATOM_N)
        if tuple(self.row_scale.shape) != rows or not self.row_scale.is_contiguous():
            raise ValueError(f"PackedMXFP4FP8.row_scale must be contiguous {list(rows)}; got {tuple(self.row_scale.shape)}")
        if self.row_scale.device != self.data.device:
            raise ValueError(f"PackedMXFP4FP8: data on {self.data.device} but row_scale on {self.row_scale.device}")

    def to(self, device: torch.device | str) -> "PackedMXFP4FP8":
        return type(self)(self.data.to(device), self.row_scale.to(device), self.n, self.k, self.rerounded_blocks,
                          self.total_blocks)

    def __repr__(self) -> str:
        share = self.rerounded_blocks / self.total_blocks if self.total_blocks else 0.0
        return (
            f"{type(self).__name__}(shape={list(self.shape)}, format=MXFP4 in the FP8-ready layout (e4m3 codes, "
            f"row scales), device={self.device},\n            bytes={describe_bytes(self.data.numel())} + row scales "
            f"{describe_bytes(self.row_scale.numel() * 4)}, re-rounded blocks {self.rerounded_blocks} of "
            f"{self.total_blocks} ({100 * share:.3g}%))"
        )


def _code_source_cpu() -> torch.Tensor:
    """For packed code q = 32 tid + 8 word + slot: the source index row * 64 + k (FP8-ready order)."""
    return _code_sources(fp8_code_position)


def _check_weight(weight: object) -> MXFP4Tensor:
    if not isinstance(weight, MXFP4Tensor):
        raise TypeError(f"pack: weight must be an MXFP4Tensor, got {type(weight).__name__}")
    if len(weight.shape) not in (2, 3):
        raise ValueError(f"pack: weight must be [E, N, K] or [N, K], got shape {tuple(weight.shape)}")
    if len(weight.shape) == 2:
        weight = MXFP4Tensor(weight.blocks.unsqueeze(0), weight.scales.unsqueeze(0))
    return weight


@dataclass(frozen=True)
class _Rebased:
    """One chunk of experts on the FP8 grid: codes (re-rounded where needed), block offsets t, row exponents."""

    codes: torch.Tensor  # uint8 [e, N, K]
    offsets: torch.Tensor  # uint8 [e, N, K/32], t in 0..FP8_MAX_OFFSET
    reference: torch.Tensor  # int32 [e, N]: R
    nan_rows: torch.Tensor  # bool [e, N]
    rerounded: int


def _rebase(chunk: MXFP4Tensor) -> _Rebased:
    """The block offsets from each row's largest scale, and the codes of the blocks too far below re-rounded."""
    scales = chunk.scales.to(torch.int32)
    nan_blocks = scales == E8M0_NAN
    reference = torch.where(nan_blocks, 0, scales).amax(dim=-1)  # [e, N]
    offset = (reference.unsqueeze(-1) - scales).masked_fill(nan_blocks, 0)
    codes = chunk.codes().view(*scales.shape, BLOCK_SIZE)
    magnitude = codes & 7
    far = (offset > FP8_MAX_OFFSET) & (magnitude != 0).any(dim=-1)
    if bool(far.any()):
        values = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=codes.device)[magnitude.long()]
        shrink = torch.exp2((FP8_MAX_OFFSET - offset).clamp(min=-40).float()).unsqueeze(-1)
        rounded = e2m1_magnitude_codes(values * shrink)
        rounded = rounded | ((codes & 8) * (rounded != 0))  # no -0 from a value that rounded away
        codes = torch.where(far.unsqueeze(-1), rounded, codes)
    return _Rebased(codes.view(chunk.codes().shape), offset.clamp(max=FP8_MAX_OFFSET).to(torch.uint8), reference,
                    nan_blocks.any(dim=-1), int(far.sum()))


def _row_scale(rebased: _Rebased) -> torch.Tensor:
    """2^(R - 127 - FP8_WEIGHT_SHIFT) per row (float32, subnormal below 2^-126), NaN for a row with a NaN block."""
    exponent = (rebased.reference - E8M0_BIAS - FP8_WEIGHT_SHIFT).double()
    scale = torch.exp2(exponent).float()
    return scale.masked_fill(rebased.nan_rows, float("nan"))


def _atoms(values: torch.Tensor, n_pad: int, k_pad: int, per_row: int, source: torch.Tensor) -> torch.Tensor:
    """[e, N, K'] (``per_row`` values per atom row: K' = K for codes, K / 32 for block bytes) padded and cut
    into atoms ``[e, N/64, K/64, 64 * per_row]``, each permuted by ``source``."""
    e, n, width = values.shape
    padded = torch.nn.functional.pad(values, (0, k_pad // ATOM_K * per_row - width, 0, n_pad - n))
    atoms = padded.view(e, n_pad // ATOM_N, ATOM_N, k_pad // ATOM_K, per_row).permute(0, 1, 3, 2, 4)
    return atoms.reshape(e, n_pad // ATOM_N, k_pad // ATOM_K, ATOM_N * per_row)[..., source]


def pack_fp8(weight: MXFP4Tensor) -> PackedMXFP4FP8:
    """``mxfp4.pack(weight, activations="fp8")``: an MXFP4 weight ``[E, N, K]`` (or ``[N, K]``) in the FP8-ready layout."""
    weight = _check_weight(weight)
    num_experts, n, k = weight.shape
    n_pad, k_pad = _round_up(n, ATOM_N), _round_up(k, ATOM_K)
    device = weight.device
    code_source, scale_source = _code_source_cpu().to(device), _scale_source(device)
    data = torch.empty((num_experts, n_pad // ATOM_N, k_pad // ATOM_K, ATOM_BYTES), dtype=torch.uint8, device=device)
    row_scale = torch.zeros((num_experts, n_pad), dtype=torch.float32, device=device)
    rerounded = 0
    step = _experts_per_chunk(n_pad, k_pad)
    for e0 in range(0, num_experts, step):
        e1 = min(num_experts, e0 + step)
        rebased = _rebase(MXFP4Tensor(weight.blocks[e0:e1], weight.scales[e0:e1]))
        codes = _atoms(rebased.codes, n_pad, k_pad, ATOM_K, code_source)
        data[e0:e1, :, :, :ATOM_CODE_BYTES] = _spread_code_bits(codes, FP8_CODE_BITS)
        offsets = rebased.offsets * FP8_OFFSET_STEP
        data[e0:e1, :, :, ATOM_CODE_BYTES:] = _atoms(offsets, n_pad, k_pad, ATOM_K // BLOCK_SIZE, scale_source)
        row_scale[e0:e1, :n] = _row_scale(rebased)
        rerounded += rebased.rerounded
    return PackedMXFP4FP8(data, row_scale, n, k, rerounded, num_experts * n * (k // BLOCK_SIZE))


def _unatom(atoms: torch.Tensor, source: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`_atoms`: [e, N/64, K/64, per_atom] in packed order -> [e, rows, cols]."""
    e, n_atoms, k_atoms, per_atom = atoms.shape
    natural = torch.empty_like(atoms)
    natural[..., source] = atoms
    per_row = per_atom // ATOM_N
    natural = natural.view(e, n_atoms, k_atoms, ATOM_N, per_row).permute(0, 1, 3, 2, 4)
    return natural.reshape(e, n_atoms * ATOM_N, k_atoms * per_row)[:, :rows, :cols]


def unpack_fp8_experts(packed: PackedMXFP4FP8, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ``start:stop`` as (codes uint8 ``[e, N, K]`` in checkpoint order, block offsets t ``[e, N, K/32]``)."""
    data = packed.data[start:stop]
    device = data.device
    codes = _gather_code_bits(data[..., :ATOM_CODE_BYTES], FP8_CODE_BITS)
    codes = _unatom(codes, _code_source_cpu().to(device), packed.n, packed.k)
    offsets = _unatom(data[..., ATOM_CODE_BYTES:], _scale_source(device), packed.n, packed.k // BLOCK_SIZE)
    return codes.contiguous(), (offsets // FP8_OFFSET_STEP).contiguous()


def decode_fp8_values(packed: PackedMXFP4FP8, start: int, stop: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The e4m3 values the W4A8 kernel multiplies, experts ``start:stop``, ``[e, N, K]`` (exact in bf16):
    ``E2M1(code) * 2^(FP8_WEIGHT_SHIFT - t)``; the weight is this times ``row_scale``."""
    codes, offsets = unpack_fp8_experts(packed, start, stop)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    values = table[codes.long()].view(*offsets.shape, BLOCK_SIZE)
    values = values * torch.exp2(FP8_WEIGHT_SHIFT - offsets.float()).unsqueeze(-1)
    return values.view(codes.shape).to(dtype)


def unpack_fp8(packed: PackedMXFP4FP8) -> MXFP4Tensor:
    """The weight ``[E, N, K]`` the FP8-ready layout holds, as MXFP4 (the source, up to re-rounded blocks and
    the scale bytes of all-zero blocks; a row with a NaN block comes back all NaN)."""
    if not isinstance(packed, PackedMXFP4FP8):
        raise TypeError(f"unpack_fp8: expected a PackedMXFP4FP8, got {type(packed).__name__}")
    codes, offsets = unpack_fp8_experts(packed, 0, packed.num_experts)
    scale = packed.row_scale[:, : packed.n]
    reference = torch.log2(scale.nan_to_num(nan=1.0).double()).round().to(torch.int32) + E8M0_BIAS + FP8_WEIGHT_SHIFT
    scales = (reference.unsqueeze(-1) - offsets.to(torch.int32)).clamp(0, 254).to(torch.uint8)
    scales = scales.masked_fill(scale.isnan().unsqueeze(-1), E8M0_NAN)
    return MXFP4Tensor.from_codes(codes, scales)
