"""The portable in-register MXFP4 kernel: reads the packed bytes, decodes them in registers, keeps no copy.

A Triton kernel (:mod:`mxfp4.portable.triton_kernel`) for any CUDA GPU from SM80 on (no Hopper-only feature is used;
tested on an H200 with the portable path forced, and on the CPU under Triton's interpreter). For expert e,
``out[rows of e] = x[rows of e] @ W_e^T``: bf16 x, fp32 accumulation (``tl.dot``), bf16 out; a grouped
variant (``offsets`` [E + 1], read on the device) and a masked one (``masked_m`` [E]). No host read of a
device tensor and no allocation, so a launch captures into a CUDA graph. This module holds the Python side:
the constants derived from ``mxfp4/format/layout.py``, availability, the tile configs and the launch.

How the kernel reads the packed layout (``layout.unpack_experts`` is the reading it matches)
---------------------------------------------------------------------------------------------
An atom's 2048 code bytes are 512 little-endian 32-bit words. The word at byte ``16 tid + 4 c`` is, with
``pair = 8 w + g`` (``tid = 32 w + 4 g + t``), word ``16 pair + 4 t + c`` of the atom: per atom a ``[32, 16]``
row-major matrix of words, rows ``pair``, columns ``4 t + c``. Slot ``i`` of word (pair, 4 t + c) is the code
of (``layout.code_position``)::

    row = 16 w + g + 8 i0                   (i0 = i & 1)
    k   = 16 c + 2 t + 8 i1 + i2            (i1 = (i >> 1) & 1, i2 = i >> 2)

so the row depends on (pair, i0) only and k on (t, c, i1, i2) only. A program loads a ``[BLOCK_R, BLOCK_C]``
tile of words (2D: row pairs over whole atoms of N, word columns over atoms of K), decodes each of the 8
slots into a ``[BLOCK_R, BLOCK_C]`` tensor and joins and permutes them (register relabelling, see
:func:`slot_position`) into the ``[2 BLOCK_R, 4 BLOCK_C]`` weight tile in (row, k) order, the register
operand of ``tl.dot`` with a plain contiguous tile of x (``out^T = W x^T``: the token count is the MMA's N).
Each row pair's scale word sits at word ``512 + pair`` of the atom; byte ``2 block + i0`` is the E8M0 scale of
row ``16 w + g + 8 i0``, values ``32 block ... 32 block + 31`` of the atom.

Decode: the SM90 kernel's, register by register. ``layout.DECODE_PIECES`` says how A-register ``j`` of a word
(slot ``j`` as its low bf16 half, slot ``j + 4`` as its high half, each with bits m, e0, e1, s at 6, 7, 8, 15:
the code's value times 2^-126 exactly, e = 0 landing on bf16 subnormals) is one or two rotate-and-mask pieces
of the word; :func:`register_pieces` turns them into shifts and masks. The two halves become the bf16 pair
(k, k + 1) of the weight tile, and the E8M0 scale ``s`` is applied as two exact power-of-two bf16 multiplies,
2^(min(s, 128) - 1) and 2^(max(s, 128) - 128) (NaN for 0xFF), each built by shifting the byte into a bf16
exponent field (two bf16x2 multiplies per register). The result is ``mxfp4.dequantize``'s value bit for bit.
On a GPU one PTX ``mov.b32 {lo, hi}`` hands a decoded register to Triton as its bf16 pair (no repacking);
Triton's interpreter, which runs no PTX, splits it with shifts (the ``PTX_SPLIT`` constexpr).

Scheduling: a 1D grid of (m-tile, n-tile) programs, n fastest, so the programs of one expert's rows run
together and read its weight once at decode (all of an expert's rows fit one m-tile). The grouped variant's
grid has a fixed upper bound of m-tiles, ``(T + min(E, T) (BLOCK_M - 1)) // BLOCK_M`` (each non-empty expert
adds at most one partial tile), from shapes alone; each program finds its expert and rows from the offsets on
the device (a cumulative sum of the experts' tile counts), and programs past the last tile return at once.
The masked variant has ``E * ceil(max_m / BLOCK_M)`` m-tiles.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from mxfp4.format.layout import ATOM_BYTES, ATOM_CODE_BYTES, ATOM_N, DECODE_PIECES

WORD_BYTES = 4
ATOM_WORDS = ATOM_BYTES // WORD_BYTES  # 544: an atom's stride in 32-bit words
PAIRS_PER_ATOM = ATOM_N // 2  # 32 word rows: row pairs (16 w + g, 16 w + g + 8)
WORD_COLUMNS = ATOM_CODE_BYTES // WORD_BYTES // PAIRS_PER_ATOM  # 16 words per row pair per atom
SCALE_WORD_AT = ATOM_CODE_BYTES // WORD_BYTES  # 512: the scale words follow the code words
MIN_CAPABILITY = (8, 0)  # bf16 tensor cores


def _shift_pieces(rotate: int, mask: int) -> tuple[int, int, int]:
    """A rotate left by ``rotate`` then ``& mask`` as (left shift, right shift, mask): a rotate is
    ``(w << r) | (w >> (32 - r))``, and a side none of the kept bits comes from is dropped (0)."""
    wrapped = (1 << rotate) - 1  # result bits a left rotate fills from the top of the word
    left = rotate if mask & ~wrapped & 0xFFFFFFFF else 0
    right = (32 - rotate) % 32 if mask & wrapped else 0
    return left, right, mask


def register_pieces() -> tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]:
    """Per A-register j (0..3) of the SM90 decode, two (left, right, mask) pieces (mask 0: absent), from
    ``layout.DECODE_PIECES``: register j holds slot j in its low bf16 half and slot j + 4 in its high half."""
    table = []
    for pieces in DECODE_PIECES:
        shifts = tuple(_shift_pieces(rotate, half_mask * 0x10001) for rotate, half_mask in pieces)
        if len(shifts) > 2:
            raise AssertionError(f"a decode register needs {len(shifts)} pieces; the kernel takes two")
        table.append(shifts + ((0, 0, 0),) * (2 - len(shifts)))
    return tuple(table)


# What the kernel gets as its REGS constexpr: register_pieces() flattened (6 ints per register).
REGS = tuple(value for pieces in register_pieces() for piece in pieces for value in piece)


def decode_register_bits(word: int, register: int) -> int:
    """The 32-bit pattern the kernel builds for A-register ``register`` of a code ``word`` (tests): bf16 bits
    of slot ``register`` (low half) and slot ``register + 4`` (high half), each the code's value * 2^-126."""
    bits = 0
    for left, right, mask in register_pieces()[register]:
        moved = word if not (left or right) else (word << left if left else 0) | (word >> right if right else 0)
        bits |= moved & mask
    return bits & 0xFFFFFFFF


def slot_position(pair: int, column: int, slot: int) -> tuple[int, int]:
    """(row, k) inside an atom where the kernel puts slot ``slot`` of word (``pair``, ``column``): the
    kernel's reshape and permute of the decoded slots (triton_kernel._natural_order), in Python."""
    aw, g = divmod(pair, 8)
    t, c = divmod(column, 4)
    i0, i1, i2 = slot & 1, (slot >> 1) & 1, slot >> 2
    return 16 * aw + 8 * i0 + g, 16 * c + 8 * i1 + 2 * t + i2


def word_of(pair: int, column: int) -> tuple[int, int]:
    """(consumer thread, word) of layout.py holding word (``pair``, ``column``) of an atom."""
    w, g = divmod(pair, 8)
    t, c = divmod(column, 4)
    return 32 * w + 4 * g + t, c


# ---------------------------------------------------------------------------------------------
# Availability (checked once per device).


@lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as error:  # missing, or broken (a wheel that does not match torch)
        return f"Triton cannot be imported ({type(error).__name__}: {error}); it ships with torch's Linux CUDA wheels"
    return None


@lru_cache(maxsize=None)
def unavailable_reason(device_type: str, index: int | None) -> str | None:
    """Why the kernel cannot run on this device (None: it can). Imports Triton only for a CUDA device."""
    if device_type != "cuda":
        return f"the in-register kernel runs on CUDA GPUs; the {device_type} path is the torch one"
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability < MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} is below 8.0 (bf16 tensor cores)"
    return _triton_import_error()


# ---------------------------------------------------------------------------------------------
# Tile configs: a static choice by rows per expert and GPU (no autotuning in the hot path or in a capture).


@dataclass(frozen=True)
class KernelConfig:
    """One program's tile: ``block_m`` rows of x, ``2 block_r`` weight rows, ``4 block_c`` values of K."""

    block_m: int
    block_r: int
    block_c: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"m{self.block_m}_n{2 * self.block_r}_k{4 * self.block_c}_w{self.num_warps}_s{self.num_stages}"

    @staticmethod
    def from_name(name: str) -> "KernelConfig":
        """Inverse of :attr:`name` (``m16_n64_k256_w4_s3``); ValueError naming the text otherwise."""
        try:
            fields = dict((part[0], int(part[1:])) for part in name.split("_"))
            config = KernelConfig(fields["m"], fields["n"] // 2, fields["k"] // 4, fields["w"], fields["s"])
        except (KeyError, ValueError, IndexError):
            raise ValueError(f"portable kernel config {name!r}: expected a name like m16_n64_k256_w4_s3") from None
        if config.name != name or min(config.block_m, config.block_r, config.block_c) < 16 or config.block_c % 16:
            raise ValueError(f"portable kernel config {name!r}: m, n/2 and k/4 must be >= 16, k a multiple of 64")
        return config


# (largest rows per expert, config), first match wins. Decode: all of an expert's rows in one program, so each
# weight byte is read once, split over N for parallelism; prefill: large tiles, for the MMA. Hopper has 227 KB
# of shared memory per block and wgmma; the others get tiles that fit 99 KB (Ada, consumer Blackwell) and
# compile without spills for SM80, 86, 89, 100 and 120 (tests/test_portable_kernel.py compiles them all).
HOPPER_CONFIGS: tuple[tuple[int, KernelConfig], ...] = (
    (16, KernelConfig(16, 32, 64, 4, 3)),
    (32, KernelConfig(32, 32, 64, 4, 3)),
    (64, KernelConfig(64, 32, 32, 4, 3)),
    (128, KernelConfig(128, 64, 16, 8, 3)),
    (1 << 62, KernelConfig(256, 64, 16, 8, 3)),
)
OTHER_CONFIGS: tuple[tuple[int, KernelConfig], ...] = (
    (16, KernelConfig(16, 32, 64, 4, 3)),
    (32, KernelConfig(32, 32, 64, 4, 3)),
    (1 << 62, KernelConfig(64, 32, 32, 8, 3)),
)


def choose_config(rows_per_expert: int, capability: tuple[int, int] = (9, 0)) -> KernelConfig:
    """The tile for about ``rows_per_expert`` rows per expert (the masked variant: max_m) on ``capability``."""
    table = HOPPER_CONFIGS if tuple(capability) == (9, 0) else OTHER_CONFIGS
    for bound, config in table:
        if rows_per_expert <= bound:
            return config
    return table[-1][1]


@lru_cache(maxsize=None)
def _capability(device_type: str, index: int | None) -> tuple[int, int]:
    """The GPU's compute capability; the interpreter (CPU tensors) gets the conservative tiles."""
    return tuple(torch.cuda.get_device_capability(index)) if device_type == "cuda" else (8, 0)


def device_config(device: torch.device, rows_per_expert: int) -> KernelConfig:
    return choose_config(rows_per_expert, _capability(device.type, device.index))


# ---------------------------------------------------------------------------------------------
# The launch.


def _compiled(device: torch.device) -> bool:
    """Whether the launch compiles for a GPU (then one PTX move splits a decoded register into its bf16 pair);
    Triton's interpreter (TRITON_INTERPRET=1, CPU tensors in the tests) runs no PTX."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def m_tiles(total_rows: int, num_experts: int, max_m: int, masked: bool, block_m: int) -> int:
    """The grid's m-tiles: exact for the masked variant, an upper bound (no host read) for the grouped one."""
    if masked:
        return num_experts * _cdiv(max_m, block_m)
    return (total_rows + min(num_experts, total_rows) * (block_m - 1)) // block_m


def launch(x: torch.Tensor, w_data: torch.Tensor, n: int, k: int, rows: torch.Tensor, masked: bool,
           out: torch.Tensor, config: KernelConfig | None = None) -> torch.Tensor:
    """``out`` = the grouped (x [T, K], rows = offsets [E + 1]) or masked (x [E, max_m, K], rows = masked_m
    [E]) product, on the current stream; no host read of ``rows``, no allocation. The ops check arguments."""
    from .triton_kernel import (
        mxfp4_grouped_kernel,  # lazy: Triton loads where the kernel runs
    )

    num_experts, n_atoms, k_atoms = w_data.shape[0], w_data.shape[1], w_data.shape[2]
    max_m = x.shape[1] if masked else 0
    total_rows = x.numel() // k
    if config is None:
        config = device_config(x.device, max_m if masked else _cdiv(total_rows, num_experts))
    n_tiles = _cdiv(n_atoms * PAIRS_PER_ATOM, config.block_r)
    programs = m_tiles(total_rows, num_experts, max_m, masked, config.block_m) * n_tiles
    if programs == 0 or n == 0:
        return out
    mxfp4_grouped_kernel[(programs,)](
        x, w_data.view(torch.int32), rows, out, total_rows, n, k, n_atoms, k_atoms, num_experts, max_m, n_tiles,
        MASKED=masked, EXPERTS_POW2=1 << max(0, (num_experts - 1).bit_length()), BLOCK_M=config.block_m,
        BLOCK_R=config.block_r, BLOCK_C=config.block_c, REGS=REGS, ATOM_WORDS=ATOM_WORDS, PAIRS=PAIRS_PER_ATOM,
        COLUMNS=WORD_COLUMNS, SCALE_AT=SCALE_WORD_AT, PTX_SPLIT=_compiled(x.device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
