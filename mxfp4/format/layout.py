"""The packed Hopper layout: the one place that says where every code bit and scale byte goes.

``pack`` permutes an MXFP4 weight ``[E, N, K]`` (codes + E8M0 scales, the checkpoint's bits) into
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

Codes: which code a word holds
------------------------------
The kernel computes ``out^T = W . x^T`` with W as the register operand A of
``wgmma.m64nNk16``. Thread ``tid`` (0..127) of the warpgroup is warp ``w = tid // 32``, group
``g = (tid % 32) // 4`` and ``t = tid % 4``; for each k16 step it owns rows ``16w + g`` and
``16w + g + 8`` at columns ``2t, 2t+1, 2t+8, 2t+9`` (PTX's register fragment of A).
Its 16 bytes hold all of that for the four k16 steps of the atom, so one 16-byte shared-memory
load per thread per 64 values of K feeds 4 WGMMAs, and a warp reads 512 contiguous bytes
(no bank conflict).

The 16 bytes are four little-endian 32-bit words; word ``c`` is k16 step ``c`` and holds 8 codes.
Slot ``i`` (0..7) of word ``c`` is the code of the element at::

    row = 16 w + g + 8 (i & 1)
    k   = 16 c + 2 t + 8 ((i >> 1) & 1) + (i >> 2)

so slots ``j`` and ``j + 4`` are the low and high bf16 of A-register ``j`` of that k16 step.

Codes: where a code's bits sit in its word
------------------------------------------
An E2M1 code is ``s e1 e0 m`` (bit 3 .. bit 0). Its bits are not kept together: each is placed so
that A-register ``j`` is one or two rotate-and-mask steps away from the word (``DECODE_PIECES``).
Bit ``p`` of every code word (the same in every word of every thread) holds::

    bit     31   30   29   28   27   26   25   24   23   22   21   20   19   18   17   16
    holds  4.s 1.e1 1.e0  1.m  7.s  3.m  6.s 4.e1 4.e0  4.m  5.s 7.e1 7.e0 6.e1 6.e0  6.m
    bit     15   14   13   12   11   10    9    8    7    6    5    4    3    2    1    0
    holds  0.s 5.e1 5.e0  5.m  3.s  7.m  2.s 0.e1 0.e0  0.m  1.s 3.e1 3.e0 2.e1 2.e0  2.m

(``i.f``: field ``f`` of the code in slot ``i``.) As a table, slot ``i``'s bits ``(m, e0, e1, s)`` are at
``CODE_BITS[i]``::

    slot 0: ( 6,  7,  8, 15)    slot 4: (22, 23, 24, 31)
    slot 1: (28, 29, 30,  5)    slot 5: (12, 13, 14, 21)
    slot 2: ( 0,  1,  2,  9)    slot 6: (16, 17, 18, 25)
    slot 3: (26,  3,  4, 11)    slot 7: (10, 19, 20, 27)

Decode (templates/mxfp4_decode.cuh mirrors this): a code placed at bf16 bits ``m -> 6, e0 -> 7,
e1 -> 8, s -> 15`` is exactly its value times 2^-126 (e = 0 lands on bf16 subnormals, E2M1's own
subnormal), so A-register ``j`` = bf16x2 {slot j, slot j + 4} times 2^-126 is::

    OR over the pieces (r, m) of DECODE_PIECES[j] of  rotl(word, r) & (m | m << 16)

    register 0: word & 0x81C081C0                                   (1 LOP3)
    register 1: rotl(word, 10) & 0x81C081C0                         (SHF + LOP3)
    register 2: (word << 6) & 0x81C081C0                            (shift + LOP3)
    register 3: rotl(word, 12) & 0x00400040 | (word << 4) & 0x81808180  (2 shifts + 2 LOP3)

9 integer instructions per word (4 A-registers), then one bf16x2 multiply by the scale factor.
One word's 32 bits cannot be split into four rotations of the register pattern (no translate
tiling exists, even across the words of a thread), so one register takes two pieces.

Scales
------
Word ``u = 8 w + g`` (bytes ``2048 + 4u .. 2048 + 4u + 3``) holds the scales of rows ``16w + g``
and ``16w + g + 8``; byte ``j`` of it is::

    row    = 16 w + g + 8 (j & 1)
    kblock = j >> 1          (values 32 kblock .. 32 kblock + 31 of the atom)

The four threads of a group read the same word (a broadcast).

Padding rows and columns hold code 0 and scale 0, which decode to exact zeros.

The FP8-ready layout (``pack(w, activations="fp8")``)
-----------------------------------------------------
A second pack-once layout, for the W4A8 kernels (e4m3 activations, FP8 WGMMA ``m64nNk32`` with the
weight as register operand A). ``mxfp4/format/layout_fp8.py`` builds and reads it; this section is its contract.
The atoms are the same (64 x 64, ``ATOM_BYTES`` each, codes then one byte per 32-block at the same byte
positions as the scales above), and so are the 4 bits per code: only the order of the codes, their bits,
and the meaning of the block bytes differ. Next to ``data`` sits ``row_scale``, float32 ``[E, N/64 * 64]``.

*Values.* Row n of expert e has a reference exponent ``R`` = the largest E8M0 scale byte of its blocks.
A block with scale byte ``s`` is ``t = R - s`` (0 .. ``FP8_MAX_OFFSET``) below it; its code ``c`` becomes
the e4m3 value ``E2M1(c) * 2^(FP8_WEIGHT_SHIFT - t)`` (every such value is a normal e4m3 number, exactly:
6 * 2^6 = 384 <= 448 at the top, 0.5 * 2^(6 - 11) = 2^-6 at the bottom), and
``row_scale[e, n] = 2^(R - 127 - FP8_WEIGHT_SHIFT)``, so ``weight = e4m3 value * row_scale``: the block
scales are honoured before the MMA, and the kernel applies ``row_scale`` (with the activation's row
scale) once per output in the epilogue. A block with ``t > FP8_MAX_OFFSET`` (more than 2^11 below its
row's largest block) is re-rounded: its values are rounded (nearest, ties to even) onto the E2M1 grid of
``t = FP8_MAX_OFFSET``; ``PackedMXFP4FP8.rerounded_blocks`` counts those with a nonzero code. A row with a
NaN block (scale 0xFF) gets ``row_scale`` NaN (every output of that row is NaN, as with the checkpoint).
Padding rows have ``row_scale`` 0.

*Block bytes.* The byte of a block holds ``FP8_OFFSET_STEP * t`` (t steps of the e4m3 exponent field).

*Codes: which code a word holds.* For ``m64nNk32`` e4m3 (PTX's register fragment of an 8-bit A), thread
``tid`` = (w, g, t) as above holds, per k32 step, rows ``16w + g`` (registers 0, 2) and ``16w + g + 8``
(registers 1, 3) at columns ``4t .. 4t + 3`` (registers 0, 1) and ``16 + 4t .. 16 + 4t + 3`` (registers
2, 3), byte j of a register being column ``+ j``. Word ``c`` (0..3) of the thread's 16 bytes is k32 step
``c >> 1`` and row half ``h = c & 1``; its slot ``i`` (0..7) is the code at::

    row = 16 w + g + 8 h
    k   = 32 (c >> 1) + 16 (i >> 2) + 4 t + (i & 3)

so slots 0..3 are the four bytes of register ``h`` and slots 4..7 those of register ``h + 2``.

*Codes: where a code's bits sit.* The magnitude bits ``e1 e0 m`` of slot ``i`` are the 3-bit field at
``16 (i >> 2) + 4 (i & 3)`` and its sign is bit ``8 (i & 3) + 3 + 4 (i >> 2)``; as ``FP8_CODE_BITS`` lists
them, slot ``i``'s bits ``(m, e0, e1, s)`` are at::

    fp8 slot 0: ( 0,  1,  2,  3)    fp8 slot 4: (16, 17, 18,  7)
    fp8 slot 1: ( 4,  5,  6, 11)    fp8 slot 5: (20, 21, 22, 15)
    fp8 slot 2: ( 8,  9, 10, 19)    fp8 slot 6: (24, 25, 26, 23)
    fp8 slot 3: (12, 13, 14, 27)    fp8 slot 7: (28, 29, 30, 31)

Decode (templates/mxfp4_decode_fp8.cuh mirrors this): with ``lo``/``hi`` the e4m3 bytes of
{0, 0.5, 1, 1.5} / {2, 3, 4, 6} times 2^(6 - t) (``FP8_TABLE_LO``/``FP8_TABLE_HI`` minus
``FP8_OFFSET_STEP * t`` in every byte, byte 0 of ``lo`` excepted: one multiply-add each, no borrow for
t <= 11), the two registers of a word are::

    index      = word & 0x77777777                      (the eight magnitudes, sign bits cleared)
    register h     = prmt(lo, hi, index)       | (word << 4) & 0x80808080
    register h + 2 = prmt(lo, hi, index >> 16) | word & 0x80808080

7 integer instructions per 8 codes (one PRMT table lookup per 4 codes), plus 3 per (row, block) for the
tables: no float instruction. PRMT reads the low 16 bits of its selector, four 3-bit indices with the
nibble's top bit (sign replication) cleared.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
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

CODES_PER_WORD = 8
# Where E2M1 bits (m, e0, e1, s) sit in a bf16 half so that the half is the code's value * 2^-126.
BF16_CODE_BITS = (6, 7, 8, 15)
# A-register j of a k16 step = OR over (rotate, half_mask) of rotl(word, rotate) & (half_mask * 0x10001):
# the decode's every shift amount and mask (rendered into the kernel), and the source of CODE_BITS.
DECODE_PIECES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 0x81C0),),
    ((10, 0x81C0),),
    ((6, 0x81C0),),
    ((12, 0x0040), (4, 0x8180)),
)

# The FP8-ready layout (see the docstring's last section); the kernel's decode reads these rendered.
FP8_MAX_OFFSET = 11  # blocks up to 2^11 below their row's largest are exact; further ones are re-rounded
FP8_OFFSET_STEP = 8  # a block byte holds 8 t: t steps of the e4m3 exponent field (bits 3..6)
FP8_WEIGHT_SHIFT = 6  # the e4m3 value is E2M1 x 2^(6 - t); row_scale = 2^(R - 127 - 6)
FP8_TABLE_LO = 0x6C686000  # e4m3 bytes of 0, 0.5, 1, 1.5 times 2^6 (PRMT source bytes 0..3 at t = 0)
FP8_TABLE_HI = 0x7C787470  # e4m3 bytes of 2, 3, 4, 6 times 2^6 (PRMT source bytes 4..7)
FP8_INDEX_MASK = 0x77777777  # the magnitude fields of a word (sign bits cleared)
FP8_SIGN_MASK = 0x80808080  # bit 7 of every e4m3 byte
FP8_SIGN_SHIFT = 4  # register h's signs sit 4 bits below bit 7 of its bytes

# Bound on the codes unpacked at once (one byte per value) while packing, in values.
_CHUNK_VALUES = 1 << 27


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def code_position(tid: int, word: int, slot: int) -> tuple[int, int]:
    """(row, k) inside an atom of the code in ``tid``'s word ``word``, slot ``slot`` (0..7)."""
    w, g, t = tid // 32, (tid % 32) // 4, tid % 4
    row = 16 * w + g + 8 * (slot & 1)
    k = 16 * word + 2 * t + 8 * ((slot >> 1) & 1) + (slot >> 2)
    return row, k


def _code_bits() -> tuple[tuple[int, int, int, int], ...]:
    """CODE_BITS from DECODE_PIECES: slot j + 4h's bit b sits where register j's piece fetches it."""
    table = []
    for slot in range(CODES_PER_WORD):
        register, half = slot % 4, slot // 4
        positions = []
        for target in BF16_CODE_BITS:
            (rotate,) = [r for r, mask in DECODE_PIECES[register] if (mask >> target) & 1]
            positions.append((target + 16 * half - rotate) % 32)
        table.append(tuple(positions))
    return tuple(table)


# CODE_BITS[slot] = word bit positions of the slot's code bits (m, e0, e1, s); see the docstring.
CODE_BITS: tuple[tuple[int, int, int, int], ...] = _code_bits()

# The FP8-ready layout's FP8_CODE_BITS[slot]: (m, e0, e1, s) of slot i at 16 (i >> 2) + 4 (i & 3) + 0, 1, 2
# and 8 (i & 3) + 3 + 4 (i >> 2) (see the docstring's last section).
FP8_CODE_BITS: tuple[tuple[int, int, int, int], ...] = tuple(
    (*(16 * (i >> 2) + 4 * (i & 3) + b for b in range(3)), 8 * (i & 3) + 3 + 4 * (i >> 2)) for i in range(CODES_PER_WORD)
)


def fp8_code_position(tid: int, word: int, slot: int) -> tuple[int, int]:
    """(row, k) inside an atom of the FP8-ready layout's code in ``tid``'s word ``word``, slot ``slot``."""
    w, g, t = tid // 32, (tid % 32) // 4, tid % 4
    row = 16 * w + g + 8 * (word & 1)
    k = 32 * (word >> 1) + 16 * (slot >> 2) + 4 * t + (slot & 3)
    return row, k


def decode_piece(register: int, piece: int) -> tuple[int, int]:
    """(rotate, half_mask) of piece ``piece`` (0 or 1) of A-register ``register``; (0, 0) if absent."""
    pieces = DECODE_PIECES[register]
    return pieces[piece] if piece < len(pieces) else (0, 0)


def code_bit_position(tid: int, word: int, bit: int) -> tuple[int, int, int]:
    """(row, k, code bit) held by bit ``bit`` (0..31) of ``tid``'s code word ``word``."""
    for slot, positions in enumerate(CODE_BITS):
        if bit in positions:
            row, k = code_position(tid, word, slot)
            return row, k, positions.index(bit)
    raise ValueError(f"code_bit_position: bit must be in 0..31, got {bit}")


def scale_position(word: int, byte: int) -> tuple[int, int]:
    """(row, kblock) inside an atom of the scale at scale word ``word``, byte ``byte``."""
    w, g = divmod(word, SCALE_WORDS_PER_WARP)
    return 16 * w + g + 8 * (byte & 1), byte >> 1


def scale_word_of_thread(tid: int) -> int:
    """The scale word consumer thread ``tid`` (0..127) reads: the one holding its rows' scales."""
    return SCALE_WORDS_PER_WARP * (tid // 32) + (tid % 32) // LANES_PER_SCALE_WORD


@lru_cache(maxsize=None)
def _code_sources(position: Callable[[int, int, int], tuple[int, int]]) -> torch.Tensor:
    """For packed code q = 32 tid + 8 word + slot: the source index row * 64 + k, where ``position`` (a layout's
    ``code_position``) says which element each (tid, word, slot) holds."""
    index = [0] * (ATOM_N * ATOM_K)
    for tid in range(128):
        for word in range(4):
            for slot in range(CODES_PER_WORD):
                row, k = position(tid, word, slot)
                index[32 * tid + 8 * word + slot] = row * ATOM_K + k
    return torch.tensor(index, dtype=torch.long)


def _code_source_cpu() -> torch.Tensor:
    return _code_sources(code_position)


def _spread_code_bits(codes: torch.Tensor, code_bits: tuple[tuple[int, ...], ...] = CODE_BITS) -> torch.Tensor:
    """uint8 codes [..., 8 * words] in slot order -> the packed bytes [..., 4 * words] (bits placed by ``code_bits``).

    Byte-wise (uint8 temporaries of one byte per word), so packing needs no wider copy of the codes.
    """
    slots = codes.view(*codes.shape[:-1], codes.shape[-1] // CODES_PER_WORD, CODES_PER_WORD)
    out = torch.zeros((*slots.shape[:-1], 4), dtype=torch.uint8, device=codes.device)  # 4 bytes per word
    for slot, positions in enumerate(code_bits):
        for bit, position in enumerate(positions):
            out[..., position // 8] |= ((slots[..., slot] >> bit) & 1) << (position % 8)
    return out.view(*codes.shape[:-1], slots.shape[-2] * 4)  # byte i of a word is its bits 8i..8i+7 (little-endian)


def _gather_code_bits(packed: torch.Tensor, code_bits: tuple[tuple[int, ...], ...] = CODE_BITS) -> torch.Tensor:
    """Inverse of _spread_code_bits: packed bytes [..., 4 * words] -> uint8 codes [..., 8 * words]."""
    words = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 4, 4)
    codes = torch.zeros((*words.shape[:-1], CODES_PER_WORD), dtype=torch.uint8, device=packed.device)
    for slot, positions in enumerate(code_bits):
        for bit, position in enumerate(positions):
            codes[..., slot] |= ((words[..., position // 8] >> (position % 8)) & 1) << bit
    return codes.view(*packed.shape[:-1], words.shape[-2] * CODES_PER_WORD)


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


class PackedGeometry:
    """What any packed layout's weight says of its size: ``data`` is ``[E, N_pad/64, K_pad/64, ATOM_BYTES]``
    atoms of the logical ``[E, n, k]`` weight (shared by PackedMXFP4 and the FP8-ready layout)."""

    data: torch.Tensor
    n: int
    k: int

    def _check_sizes(self) -> None:
        """TypeError naming ``n`` or ``k`` when it is not a whole number, ValueError when it is out of range."""
        owner = type(self).__name__
        for name in ("n", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
                raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
        if self.n < 0 or self.k <= 0:  # an empty N is a weight; an empty K has no block to scale
            raise ValueError(f"{owner}: n must be >= 0 and k positive; got n={self.n!r}, k={self.k!r}")

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


@dataclass(frozen=True, repr=False)
class PackedMXFP4(PackedGeometry):
    """An MXFP4 weight ``[E, N, K]`` in the packed Hopper layout (see the module docstring)."""

    data: torch.Tensor  # uint8 [E, N_pad/64, K_pad/64, ATOM_BYTES]
    n: int
    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.uint8:
            raise TypeError("PackedMXFP4.data must be a uint8 torch.Tensor")
        self._check_sizes()
        expected = (_round_up(self.n, ATOM_N) // ATOM_N, _round_up(self.k, ATOM_K) // ATOM_K, ATOM_BYTES)
        if self.data.dim() != 4 or tuple(self.data.shape[1:]) != expected:
            raise ValueError(
                f"PackedMXFP4.data must have shape [E, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"for N={self.n}, K={self.k}; got {tuple(self.data.shape)}"
            )
        if not self.data.is_contiguous():
            raise ValueError("PackedMXFP4.data must be contiguous")

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
        out[e0:e1, :, :, :ATOM_CODE_BYTES] = _spread_code_bits(codes)
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
    slots = _gather_code_bits(data[..., :ATOM_CODE_BYTES])
    codes = torch.empty_like(slots)
    codes[..., _code_source(device)] = slots
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
