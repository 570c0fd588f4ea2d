"""The packed Hopper layout: the one place that says where every nibble and scale byte goes.

``pack`` permutes an MXFP4 weight ``[E, N, K]`` (codes + E8M0 scales, the checkpoint's bytes) into
the order the SM90 kernel reads; ``unpack`` is its inverse. The layout does not depend on the tile
config: every generated kernel reads the same packed copy, so tuning never repacks.

Atoms
-----
N is zero-padded to a multiple of 64 and K to a multiple of 64. The weight is cut into atoms of
64 rows (N) x 64 values (K). ``PackedMXFP4.data`` is uint8 ``[E, N/64, K/64, ATOM_BYTES]``:
atoms of one row of atoms are adjacent along K, so ``k`` consecutive atoms are one contiguous byte
range and one bulk copy (TMA) moves a whole ``64 x 64k`` slab. Each atom is 2176 bytes:

* bytes ``[0, 2048)``: the 4096 codes, 16 bytes per thread of the consumer warpgroup;
* bytes ``[2048, 2176)``: the 128 scales (64 rows x 2 blocks of 32), 4 bytes per row pair.

Codes
-----
The kernel computes ``out^T = W . x^T`` with W as the register operand A of
``wgmma.m64nNk16``. Thread ``tid`` (0..127) of the warpgroup is warp ``w = tid // 32``, group
``g = (tid % 32) // 4`` and ``t = tid % 4``; for each k16 step it owns rows ``16w + g`` and
``16w + g + 8`` at columns ``2t, 2t+1, 2t+8, 2t+9`` (PTX's register fragment of A).
Its 16 bytes hold all of that for the four k16 steps of the atom, so one 16-byte shared-memory
load per thread per 64 values of K feeds 4 WGMMAs, and a warp reads 512 contiguous bytes
(no bank conflict).

The 16 bytes are four little-endian 32-bit words; word ``c`` is k16 step ``c``. Nibble ``i``
(bits ``4i..4i+3``) of word ``c`` holds the element at::

    row = 16 w + g + 8 (i & 1)
    k   = 16 c + 2 t + 8 ((i >> 1) & 1) + (i >> 2)

so nibbles ``j`` and ``j + 4`` are the low and high bf16 of A-register ``j`` of that k16 step:
register ``j`` of the fragment is one shift and two masks away from the word.

Scales
------
Word ``u = 8 w + g`` (bytes ``2048 + 4u .. 2048 + 4u + 3``) holds the scales of rows ``16w + g``
and ``16w + g + 8``; byte ``j`` of it is::

    row    = 16 w + g + 8 (j & 1)
    kblock = j >> 1          (values 32 kblock .. 32 kblock + 31 of the atom)

The four threads of a group read the same word (a broadcast).

Padding rows and columns hold code 0 and scale 0, which decode to exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .tensor import BLOCK_SIZE, MXFP4Tensor, describe_bytes

ATOM_N = 64
ATOM_K = 64
ATOM_CODE_BYTES = ATOM_N * ATOM_K // 2  # 2048
ATOM_SCALE_BYTES = ATOM_N * (ATOM_K // BLOCK_SIZE)  # 128
ATOM_BYTES = ATOM_CODE_BYTES + ATOM_SCALE_BYTES  # 2176, a multiple of 16 for bulk copies
# Thread tid of a consumer warpgroup reads scale word SCALE_WORDS_PER_WARP * (tid // 32) +
# (tid % 32) // LANES_PER_SCALE_WORD: its warp's 8 row pairs, one word per group of 4 lanes.
SCALE_WORDS_PER_WARP = 8
LANES_PER_SCALE_WORD = 4

# Bound on the codes unpacked at once (one byte per value) while packing, in values.
_CHUNK_VALUES = 1 << 27


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def code_position(tid: int, word: int, nibble: int) -> tuple[int, int]:
    """(row, k) inside an atom of the code at ``tid``'s word ``word``, nibble ``nibble``."""
    w, g, t = tid // 32, (tid % 32) // 4, tid % 4
    row = 16 * w + g + 8 * (nibble & 1)
    k = 16 * word + 2 * t + 8 * ((nibble >> 1) & 1) + (nibble >> 2)
    return row, k


def scale_position(word: int, byte: int) -> tuple[int, int]:
    """(row, kblock) inside an atom of the scale at scale word ``word``, byte ``byte``."""
    w, g = divmod(word, SCALE_WORDS_PER_WARP)
    return 16 * w + g + 8 * (byte & 1), byte >> 1


def scale_word_of_thread(tid: int) -> int:
    """The scale word consumer thread ``tid`` (0..127) reads: the one holding its rows' scales."""
    return SCALE_WORDS_PER_WARP * (tid // 32) + (tid % 32) // LANES_PER_SCALE_WORD


@lru_cache(maxsize=None)
def _code_source_cpu() -> torch.Tensor:
    """For packed nibble p = 32 tid + 8 word + nibble: the source index row * 64 + k."""
    index = [0] * (ATOM_N * ATOM_K)
    for tid in range(128):
        for word in range(4):
            for nibble in range(8):
                row, k = code_position(tid, word, nibble)
                index[32 * tid + 8 * word + nibble] = row * ATOM_K + k
    return torch.tensor(index, dtype=torch.long)


@lru_cache(maxsize=None)
def _scale_source_cpu() -> torch.Tensor:
    """For packed scale byte q = 4 word + byte: the source index row * 2 + kblock."""
    blocks_per_atom = ATOM_K // BLOCK_SIZE
    index = [0] * ATOM_SCALE_BYTES
    for word in range(ATOM_SCALE_BYTES // 4):
        for byte in range(4):
            row, kblock = scale_position(word, byte)
            index[4 * word + byte] = row * blocks_per_atom + kblock
    return torch.tensor(index, dtype=torch.long)


def _code_source(device: torch.device) -> torch.Tensor:
    return _code_source_cpu().to(device)


def _scale_source(device: torch.device) -> torch.Tensor:
    return _scale_source_cpu().to(device)


@dataclass(frozen=True, repr=False)
class PackedMXFP4:
    """An MXFP4 weight ``[E, N, K]`` in the packed Hopper layout (see the module docstring)."""

    data: torch.Tensor  # uint8 [E, N_pad/64, K_pad/64, ATOM_BYTES]
    n: int
    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.uint8:
            raise TypeError("PackedMXFP4.data must be a uint8 torch.Tensor")
        if self.n < 0 or self.k <= 0:  # an empty N is a weight; an empty K has no block to scale
            raise ValueError(f"PackedMXFP4: n must be >= 0 and k positive; got n={self.n!r}, k={self.k!r}")
        expected = (_round_up(self.n, ATOM_N) // ATOM_N, _round_up(self.k, ATOM_K) // ATOM_K, ATOM_BYTES)
        if self.data.dim() != 4 or tuple(self.data.shape[1:]) != expected:
            raise ValueError(
                f"PackedMXFP4.data must have shape [E, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"for N={self.n}, K={self.k}; got {tuple(self.data.shape)}"
            )
        if not self.data.is_contiguous():
            raise ValueError("PackedMXFP4.data must be contiguous")

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> torch.Size:
        """The logical shape ``[E, N, K]``."""
        return torch.Size((self.num_experts, self.n, self.k))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def n_atoms(self) -> int:
        return self.data.shape[1]

    @property
    def k_atoms(self) -> int:
        return self.data.shape[2]

    def to(self, device: torch.device | str) -> "PackedMXFP4":
        return PackedMXFP4(self.data.to(device), self.n, self.k)

    def __repr__(self) -> str:
        return (
            f"PackedMXFP4(shape={list(self.shape)}, format=MXFP4 in the packed Hopper layout "
            f"(data {list(self.data.shape)} uint8: atoms of {ATOM_N}x{ATOM_K}), device={self.device},\n"
            f"            bytes={describe_bytes(self.data.numel())})"
        )


def _experts_per_chunk(n_pad: int, k_pad: int) -> int:
    return max(1, _CHUNK_VALUES // max(1, n_pad * k_pad))  # N = 0 packs to an empty result


def pack(weight: MXFP4Tensor) -> PackedMXFP4:
    """Permute an MXFP4 weight ``[E, N, K]`` (or ``[N, K]``, taken as E = 1) into the packed layout.

    Runs on the weight's device with vectorized torch ops, a bounded number of experts at a time.
    """
    if not isinstance(weight, MXFP4Tensor):
        raise TypeError(f"pack: weight must be an MXFP4Tensor, got {type(weight).__name__}")
    if len(weight.shape) not in (2, 3):
        raise ValueError(f"pack: weight must be [E, N, K] or [N, K], got shape {tuple(weight.shape)}")
    if len(weight.shape) == 2:
        weight = MXFP4Tensor(weight.blocks.unsqueeze(0), weight.scales.unsqueeze(0))
    num_experts, n, k = weight.shape
    n_pad, k_pad = _round_up(n, ATOM_N), _round_up(k, ATOM_K)
    n_atoms, k_atoms = n_pad // ATOM_N, k_pad // ATOM_K
    device = weight.device
    code_source, scale_source = _code_source(device), _scale_source(device)
    out = torch.empty((num_experts, n_atoms, k_atoms, ATOM_BYTES), dtype=torch.uint8, device=device)
    step = _experts_per_chunk(n_pad, k_pad)
    for e0 in range(0, num_experts, step):
        e1 = min(num_experts, e0 + step)
        chunk = MXFP4Tensor(weight.blocks[e0:e1], weight.scales[e0:e1])
        codes = torch.nn.functional.pad(chunk.codes(), (0, k_pad - k, 0, n_pad - n))
        codes = codes.view(e1 - e0, n_atoms, ATOM_N, k_atoms, ATOM_K).permute(0, 1, 3, 2, 4)
        codes = codes.reshape(e1 - e0, n_atoms, k_atoms, ATOM_N * ATOM_K)[..., code_source]
        out[e0:e1, :, :, :ATOM_CODE_BYTES] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales = torch.nn.functional.pad(chunk.scales, (0, (k_pad - k) // BLOCK_SIZE, 0, n_pad - n))
        scales = scales.view(e1 - e0, n_atoms, ATOM_N, k_atoms, ATOM_K // BLOCK_SIZE).permute(0, 1, 3, 2, 4)
        scales = scales.reshape(e1 - e0, n_atoms, k_atoms, ATOM_SCALE_BYTES)[..., scale_source]
        out[e0:e1, :, :, ATOM_CODE_BYTES:] = scales
    return PackedMXFP4(out, n, k)


def unpack_experts(packed: PackedMXFP4, start: int, stop: int) -> MXFP4Tensor:
    """Experts ``start:stop`` of a packed weight back in checkpoint order, ``[stop - start, N, K]``."""
    data = packed.data[start:stop]
    count = data.shape[0]
    n_atoms, k_atoms = packed.n_atoms, packed.k_atoms
    device = data.device
    code_bytes = data[..., :ATOM_CODE_BYTES]
    nibbles = torch.stack((code_bytes & 0x0F, code_bytes >> 4), dim=-1).reshape(
        count, n_atoms, k_atoms, ATOM_N * ATOM_K
    )
    codes = torch.empty_like(nibbles)
    codes[..., _code_source(device)] = nibbles
    codes = codes.view(count, n_atoms, k_atoms, ATOM_N, ATOM_K).permute(0, 1, 3, 2, 4)
    codes = codes.reshape(count, n_atoms * ATOM_N, k_atoms * ATOM_K)[:, : packed.n, : packed.k]
    scale_bytes = data[..., ATOM_CODE_BYTES:]
    scales = torch.empty_like(scale_bytes)
    scales[..., _scale_source(device)] = scale_bytes
    blocks_per_atom = ATOM_K // BLOCK_SIZE
    scales = scales.view(count, n_atoms, k_atoms, ATOM_N, blocks_per_atom).permute(0, 1, 3, 2, 4)
    scales = scales.reshape(count, n_atoms * ATOM_N, k_atoms * blocks_per_atom)
    scales = scales[:, : packed.n, : packed.k // BLOCK_SIZE]
    return MXFP4Tensor.from_codes(codes.contiguous(), scales)


def unpack(packed: PackedMXFP4) -> MXFP4Tensor:
    """Inverse of :func:`pack`: the weight ``[E, N, K]`` in checkpoint order."""
    if not isinstance(packed, PackedMXFP4):
        raise TypeError(f"unpack: expected a PackedMXFP4, got {type(packed).__name__}")
    return unpack_experts(packed, 0, packed.num_experts)
