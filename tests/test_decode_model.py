"""A bit-level model of the device decode (templates/mxfp4_decode.cuh + ConsumerState::decode_chunk).

It replays the kernel's integer ops on packed words (uint32 numpy), the E8M0 -> bf16 factor
construction of both paths, and ``mul.rn.bf16x2`` (an exact product, rounded to nearest even to
bf16), then puts every A-register half back at its (row, k) and compares bit for bit with
``mxfp4.dequantize``. This is what shows the decode exact without a GPU; the GPU test
``test_gpu_kernel.py::test_decode_is_bit_exact`` reads the same values back through WGMMA.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import mxfp4
from codegen.build.paths import TEMPLATES_DIR
from mxfp4.format import layout
from mxfp4.format.layout import (
    ATOM_CODE_BYTES,
    ATOM_K,
    ATOM_N,
    CODES_PER_WORD,
    MXFP4Tensor,
)

U32 = np.uint32
BF16_CANONICAL_NAN = 0x7FFF


# ---------------------------------------------------------------------------------------------
# the device ops
# ---------------------------------------------------------------------------------------------


def decode_piece(word: np.ndarray, rotate: int, half_mask: int) -> np.ndarray:
    """mxfp4_decode.cuh decode_piece<Rotate, HalfMask>: the same branch, the same op."""
    mask = U32(half_mask * 0x00010001)
    if half_mask == 0:
        return np.zeros_like(word)
    if rotate == 0:
        return word & mask
    if int(mask) & ((1 << rotate) - 1) == 0:  # no kept bit wraps: a plain shift
        return (word << U32(rotate)) & mask
    return ((word << U32(rotate)) | (word >> U32(32 - rotate))) & mask  # __funnelshift_l(w, w, r)


def decode_e2m1_pair(word: np.ndarray, register: int) -> np.ndarray:
    """A-register ``register`` (bf16x2 {slot j, slot j + 4} times 2^-126) from code words."""
    return decode_piece(word, *layout.decode_piece(register, 0)) | decode_piece(word, *layout.decode_piece(register, 1))


def byte_perm(a: np.ndarray, b: np.ndarray | int, selector: int) -> np.ndarray:
    """__byte_perm(a, b, s) (PRMT, default mode): result byte i = byte (s >> 4i) & 7 of {b, a}."""
    a, b = np.asarray(a, dtype=U32), np.broadcast_to(np.asarray(b, dtype=U32), np.shape(a))
    pool = [(a >> U32(8 * i)) & U32(0xFF) for i in range(4)] + [(b >> U32(8 * i)) & U32(0xFF) for i in range(4)]
    out = np.zeros(np.shape(a), dtype=U32)
    for i in range(4):
        out |= pool[(selector >> (4 * i)) & 7] << U32(8 * i)
    return out


def e8m0_factors_below_128(scales: np.ndarray) -> list[np.ndarray]:
    """The fast path's four bf16x2 factors {2^(s-1), 2^(s-1)}, one per scale byte."""
    biased = scales + U32(0x7E7E7E7E)  # uint32 wrap-around, as on the device
    return [byte_perm(biased, 0, selector) >> U32(1) for selector in (0x0404, 0x1414, 0x2424, 0x3434)]


def e8m0_scale_factors(scale_byte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The general path's (lo, hi) bf16x2 factors of one scale byte per element."""
    below = np.minimum(scale_byte, U32(128))
    above = np.maximum(scale_byte, U32(128))
    lo = (below + U32(126)) << U32(7)
    hi = np.where(scale_byte == U32(0xFF), U32(0x7FC0), (above - U32(1)) << U32(7)).astype(U32)
    return lo | (lo << U32(16)), hi | (hi << U32(16))


def bf16_to_float64(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> their exact values (bf16 is the top half of a float32)."""
    with np.errstate(invalid="ignore"):  # NaN patterns stay NaN
        return (bits.astype(U32) << U32(16)).view(np.float32).astype(np.float64)


def float64_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even to bf16 bit patterns: subnormals kept, overflow to inf, NaN canonical."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _, exponent = np.frexp(values)  # |x| = f * 2^exponent, 0.5 <= f < 1
        ulp = np.ldexp(1.0, np.maximum(exponent - 1, -126) - 7)  # 8 significant bits; 2^-133 below 2^-126
        rounded = np.where(np.isfinite(values), np.round(values / ulp) * ulp, values)  # np.round: ties to even
        rounded = np.where(np.abs(rounded) >= 2.0**128, np.copysign(np.inf, values), rounded)
        bits = rounded.astype(np.float32).view(U32) >> U32(16)  # exact: rounded is a bf16 value
    return np.where(np.isnan(values), U32(BF16_CANONICAL_NAN), bits).astype(U32)


def mul_bf16x2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mul.rn.bf16x2 on packed pairs: each half multiplied exactly, then rounded once."""
    out = np.zeros_like(a)
    for shift in (U32(0), U32(16)):
        x = bf16_to_float64((a >> shift) & U32(0xFFFF))
        y = bf16_to_float64((b >> shift) & U32(0xFFFF))
        out |= float64_to_bf16(x * y) << shift
    return out


# ---------------------------------------------------------------------------------------------
# one atom-thread as decode_chunk does it, then the whole packed weight back at (row, k)
# ---------------------------------------------------------------------------------------------


def decode_words(codes: np.ndarray, scales: np.ndarray, fast: np.ndarray) -> np.ndarray:
    """decode_chunk for arrays of (atom, thread): ``codes`` uint32 [..., 4], ``scales`` uint32 [...], and the path
    each (atom, thread) takes (``fast`` bool [...], from :func:`fast_path_vote`).

    Returns the A registers uint32 [..., 4 steps, 4 registers].
    """
    regs = np.zeros((*codes.shape, 4), dtype=U32)
    quick_codes, quick_scales = codes[fast], scales[fast]
    slow_codes, slow_scales = codes[~fast], scales[~fast]
    factor = e8m0_factors_below_128(quick_scales)
    pairs = [e8m0_scale_factors((slow_scales >> U32(8 * byte)) & U32(0xFF)) for byte in range(4)]
    for step in range(4):
        block = step >> 1  # words x, y: the first 32-block; z, w: the second
        for register in range(4):
            row_bit = register & 1  # registers 0, 2: row g; 1, 3: row g + 8
            quick = decode_e2m1_pair(quick_codes[..., step], register)
            regs[..., step, register][fast] = mul_bf16x2(quick, factor[2 * block + row_bit])
            lo, hi = pairs[2 * block + row_bit]
            slow = decode_e2m1_pair(slow_codes[..., step], register)
            regs[..., step, register][~fast] = mul_bf16x2(mul_bf16x2(slow, lo), hi)
    return regs


def fast_path_vote(scales: np.ndarray, atoms_per_vote: int) -> np.ndarray:
    """decode_chunk's path choice for ``scales`` uint32 [E, n_atoms, k_atoms, 128 threads]: the fast path runs where
    every scale byte that one warp loads for a chunk (its 32 lanes, the ``atoms_per_vote`` atoms along N that one
    consumer warpgroup decodes together: AtomsPerWarpgroup) is below 128 (``__any_sync`` over the lanes)."""
    e, n_atoms, k_atoms, threads = scales.shape
    small = (scales & U32(0x80808080)) == 0
    groups = -(-n_atoms // atoms_per_vote)
    padded = np.ones((e, groups * atoms_per_vote, k_atoms, threads), dtype=bool)
    padded[:, :n_atoms] = small  # a tile's atoms past N are zero padding, which never votes for the general path
    votes = padded.reshape(e, groups, atoms_per_vote, k_atoms, threads // 32, 32).all(axis=(2, 5))
    fast = np.repeat(np.repeat(votes, atoms_per_vote, axis=1), 32, axis=3)
    return fast[:, :n_atoms]


def _slot_index() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every (tid, step, register, half): its atom (row, k) from layout.code_position."""
    tid, step, register, half = np.meshgrid(np.arange(128), np.arange(4), np.arange(4), np.arange(2), indexing="ij")
    rows = np.zeros(tid.shape, dtype=np.int64)
    cols = np.zeros(tid.shape, dtype=np.int64)
    for index in np.ndindex(tid.shape):
        slot = int(register[index] + 4 * half[index])
        rows[index], cols[index] = layout.code_position(int(tid[index]), int(step[index]), slot)
    return tid, step, register, half, rows * ATOM_K + cols


def model_decode(packed: layout.PackedMXFP4, atoms_per_vote: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """The kernel's decoded A operand of a packed weight: bf16 bits int64 [E, N, K], fast-path flags (the warp-wide
    vote of a consumer warpgroup that decodes ``atoms_per_vote`` atoms per chunk)."""
    data = packed.data.numpy()
    experts, n_atoms, k_atoms = data.shape[:3]
    codes = np.ascontiguousarray(data[..., :ATOM_CODE_BYTES]).view("<u4").reshape(experts, n_atoms, k_atoms, 128, 4)
    scale_words = np.ascontiguousarray(data[..., ATOM_CODE_BYTES:]).view("<u4")
    thread_word = np.array([layout.scale_word_of_thread(tid) for tid in range(128)])
    scales = scale_words[..., thread_word].astype(U32)
    fast = fast_path_vote(scales, atoms_per_vote)
    regs = decode_words(codes.astype(U32), scales, fast)
    tid, step, register, half, position = _slot_index()
    halves = (regs[:, :, :, tid, step, register] >> (U32(16) * half.astype(U32))) & U32(0xFFFF)
    atoms = np.zeros((experts, n_atoms, k_atoms, ATOM_N * ATOM_K), dtype=np.int64)
    atoms[..., position.reshape(-1)] = halves.reshape(experts, n_atoms, k_atoms, -1)
    full = atoms.reshape(experts, n_atoms, k_atoms, ATOM_N, ATOM_K).transpose(0, 1, 3, 2, 4)
    full = full.reshape(experts, n_atoms * ATOM_N, k_atoms * ATOM_K)[:, : packed.n, : packed.k]
    return torch.from_numpy(np.ascontiguousarray(full)), fast


def reference_bits(w: MXFP4Tensor) -> torch.Tensor:
    return mxfp4.dequantize(w, torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def assert_bit_exact(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    nan_got = ((got & 0x7F80) == 0x7F80) & ((got & 0x7F) != 0)
    nan_expected = ((expected & 0x7F80) == 0x7F80) & ((expected & 0x7F) != 0)
    assert torch.equal(nan_got, nan_expected), f"{what}: NaN positions differ"
    differ = (got != expected) & ~nan_got
    assert not bool(differ.any()), (
        f"{what}: {int(differ.sum())} values differ; first at {differ.nonzero()[0].tolist()}: "
        f"got {int(got[differ][0]):#06x}, expected {int(expected[differ][0]):#06x}"
    )


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def every_code_with(scales_block0: torch.Tensor, scales_block1: torch.Tensor, seed: int) -> MXFP4Tensor:
    """Rows r: every one of the 16 codes twice in each 32-block, shuffled, with the given scales."""
    generator = torch.Generator().manual_seed(seed)
    n = scales_block0.numel()
    codes = torch.arange(16, dtype=torch.uint8).repeat(n, 4)
    codes = torch.gather(codes, 1, torch.argsort(torch.rand(n, 64, generator=generator), dim=1))
    scales = torch.stack((scales_block0, scales_block1), dim=1).to(torch.uint8)
    return MXFP4Tensor.from_codes(codes.unsqueeze(0), scales.unsqueeze(0))


def test_fast_path_every_code_every_scale_below_128(seed: int) -> None:
    scales = torch.arange(128)
    w = every_code_with(scales, scales.flip(0), seed)
    got, fast = model_decode(mxfp4.pack(w))
    assert fast.all(), "every scale word is below 128: the fast path must run everywhere"
    assert_bit_exact(got, reference_bits(w), f"fast path, seed {seed}")


def test_general_path_every_code_every_scale(seed: int) -> None:
    # The second block's scales are >= 128, so every thread's scale word takes the general path,
    # which then sees all 256 bytes (0xFF = NaN included) in the first block.
    scales = torch.arange(256)
    w = every_code_with(scales, 128 + scales % 128, seed)
    got, fast = model_decode(mxfp4.pack(w))
    assert not fast.any()
    assert_bit_exact(got, reference_bits(w), f"general path, seed {seed}")


@pytest.mark.parametrize("atoms_per_vote", [1, 2, 4])
@pytest.mark.parametrize(("e", "n", "k", "scale_limit"), [(2, 200, 96, 256), (1, 130, 160, 128), (3, 64, 64, 120)])
def test_random_weights_with_tails(e: int, n: int, k: int, scale_limit: int, atoms_per_vote: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(0, scale_limit, (e, n, k // 32), dtype=torch.uint8, generator=generator)
    w = MXFP4Tensor(blocks, scales)
    got, _ = model_decode(mxfp4.pack(w), atoms_per_vote)
    assert_bit_exact(got, reference_bits(w), f"E={e} N={n} K={k}, {atoms_per_vote} atoms per vote, seed {seed}")


def test_one_large_scale_sends_its_warps_chunk_down_the_general_path(seed: int) -> None:
    """Small scales decode bit for bit on the general path too: what a warp whose other lane or atom holds a scale
    of 128 or more does."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (1, 128, 64 // 32, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(0, 128, (1, 128, 64 // 32), dtype=torch.uint8, generator=generator)
    scales[0, 70, 1] = 200  # row 70: the second atom along N, warp 0 (rows 64..79)
    w = MXFP4Tensor(blocks, scales)
    got, fast = model_decode(mxfp4.pack(w), atoms_per_vote=2)
    assert not fast[0, :, 0, :32].any() and fast[0, :, 0, 32:].all()  # warp 0 of both atoms votes for the general path
    assert_bit_exact(got, reference_bits(w), f"one large scale, seed {seed}")


def test_padding_decodes_to_positive_zero() -> None:
    w = mxfp4.quantize(torch.randn(1, 10, 32))
    packed = mxfp4.pack(w)
    got, _ = model_decode(layout.PackedMXFP4(packed.data, ATOM_N, ATOM_K))
    assert int(got[0, 10:].count_nonzero()) == 0 and int(got[0, :, 32:].count_nonzero()) == 0


def test_registers_place_code_bits_where_bf16_wants_them() -> None:
    """Each slot's code, alone in a word, lands as bf16 bits m, e0, e1, s -> 6, 7, 8, 15 of its half."""
    for slot, positions in enumerate(layout.CODE_BITS):
        for code in range(16):
            word = sum(((code >> bit) & 1) << position for bit, position in enumerate(positions))
            regs = [int(decode_e2m1_pair(np.array([word], dtype=U32), j)[0]) for j in range(4)]
            expected = sum(((code >> bit) & 1) << target for bit, target in enumerate(layout.BF16_CODE_BITS))
            want = [0, 0, 0, 0]
            want[slot % 4] = expected << (16 * (slot // 4))
            assert regs == want, (slot, code)


def test_mul_bf16x2_model_matches_torch(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 1 << 16, (4096,), dtype=torch.int32, generator=generator)
    b = torch.randint(0, 1 << 16, (4096,), dtype=torch.int32, generator=generator)
    a[:16] = torch.tensor([0x0000, 0x8000, 0x0001, 0x8040, 0x7F80, 0xFF80, 0x7FC0, 0x0040] * 2)
    as_bf16 = lambda x: x.to(torch.int16).view(torch.bfloat16)  # noqa: E731
    # torch multiplies in float32 and rounds once; compare where that float32 product is exact.
    exact = as_bf16(a).double() * as_bf16(b).double()
    keep = (exact.float().double() == exact) | exact.isnan()
    expected = (as_bf16(a).float() * as_bf16(b).float()).to(torch.bfloat16).view(torch.int16).long() & 0xFFFF
    got = mul_bf16x2(a.numpy().astype(U32), b.numpy().astype(U32)).astype(np.int64)
    got_t = torch.from_numpy(got)
    assert_bit_exact(got_t[keep], expected[keep], f"bf16 multiply, seed {seed}")


def test_header_does_the_modelled_ops() -> None:
    """The model above replays these lines; a change to the header must change the model too."""
    text = (TEMPLATES_DIR / "mxfp4_decode.cuh").read_text()
    for line in (
        "return word & mask;",
        "return (word << Rotate) & mask;",
        "return __funnelshift_l(word, word, Rotate) & mask;",
        "(mask & ((1u << Rotate) - 1u)) == 0u",
        "uint32_t const biased = scales + 0x7E7E7E7Eu;",
        "factor[0] = __byte_perm(biased, 0u, 0x0404u) >> 1;",
        'asm("mul.rn.bf16x2 %0, %1, %2;"',
        "uint32_t const hi = scale_byte == 0xFFu ? 0x7FC0u : (above - 1u) << 7;",
    ):
        assert line in text, line
    source = (TEMPLATES_DIR / "mxfp4_grouped_mm_sm90.cuh").read_text()
    assert "any_scale |= scales[a];" in source  # the vote spans the chunk's atoms ...
    assert "!__any_sync(0xffffffffu, (any_scale & 0x80808080u) != 0u)" in source  # ... and the warp's lanes


def test_code_words_hold_each_code_bit_once() -> None:
    assert sorted(p for positions in layout.CODE_BITS for p in positions) == list(range(32))
    assert len(layout.CODE_BITS) == CODES_PER_WORD
