"""A bit-level model of the W4A8 decode (templates/mxfp4_decode_fp8.cuh + the Fp8 branch of decode_chunk).

It replays the kernel's integer ops on the packed words of ``mxfp4.pack(w, activations="fp8")`` (uint32
numpy): the table build from the block byte, PRMT in its default mode (sign replication included), the
masks and shifts; then puts every byte of every A register where PTX's fragment of an 8-bit A operand of
``wgmma.m64nNk32`` says it goes (written here from CuTe's ``ALayout_64x32``, not from mxfp4/format/layout.py),
and compares bit for bit with the e4m3 encoding of ``weight / row_scale`` computed from the MXFP4 source
(``mxfp4.dequantize``), for every code at every block offset 0..11. The GPU test
``test_gpu_w4a8.py::test_decode_is_bit_exact`` reads the same values back through QGMMA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mxfp4
from codegen.build.paths import TEMPLATES_DIR
from mxfp4.format import layout
from mxfp4.format.layout import ATOM_CODE_BYTES, ATOM_K, ATOM_N, MXFP4Tensor

U32 = np.uint32


# ---------------------------------------------------------------------------------------------
# the device ops
# ---------------------------------------------------------------------------------------------


def prmt(lo: np.ndarray, hi: np.ndarray, selector: np.ndarray) -> np.ndarray:
    """prmt.b32 d, lo, hi, selector (default mode): byte i = byte (s_i & 7) of {hi, lo}, or that byte's
    sign replicated when s_i & 8; s_i = selector bits 4i .. 4i + 3 (the high 16 bits are not read)."""
    lo, hi, selector = (np.asarray(v, dtype=U32) for v in np.broadcast_arrays(lo, hi, selector))
    pool = [(lo >> U32(8 * i)) & U32(0xFF) for i in range(4)] + [(hi >> U32(8 * i)) & U32(0xFF) for i in range(4)]
    out = np.zeros(lo.shape, dtype=U32)
    for i in range(4):
        nibble = (selector >> U32(4 * i)) & U32(0xF)
        chosen = np.choose((nibble & U32(7)).astype(np.int64), pool).astype(U32)
        replicated = np.where(chosen & U32(0x80), U32(0xFF), U32(0)).astype(U32)
        out |= np.where(nibble & U32(8), replicated, chosen).astype(U32) << U32(8 * i)
    return out


def fp8_tables(offset_byte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mxfp4_decode_fp8.cuh fp8_tables: one multiply-add per table (uint32 wrap-around, as on the device)."""
    b = offset_byte.astype(np.uint64)
    lo = (U32(layout.FP8_TABLE_LO) - (b * 0x01010100).astype(np.uint64)) & 0xFFFFFFFF
    hi = (U32(layout.FP8_TABLE_HI) - (b * 0x01010101).astype(np.uint64)) & 0xFFFFFFFF
    return lo.astype(U32), hi.astype(U32)


def decode_word_fp8(word: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Registers h and h + 2 of a word (mxfp4_decode_fp8.cuh decode_word_fp8)."""
    index = word & U32(layout.FP8_INDEX_MASK)
    sign_bits = U32(0x80808080)
    low = prmt(lo, hi, index) | ((word << U32(layout.FP8_SIGN_SHIFT)) & sign_bits)
    high = prmt(lo, hi, index >> U32(16)) | (word & sign_bits)
    return low, high


def decode_atoms(codes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """decode_atom_fp8 for arrays of (atom, thread): codes uint32 [..., 4], offsets uint32 [...] ->
    A registers uint32 [..., 2 steps, 4 registers]."""
    regs = np.zeros((*codes.shape[:-1], 2, 4), dtype=U32)
    for c in range(4):
        step, half = c >> 1, c & 1
        byte = prmt(offsets, U32(0), U32(0x4440 + c))  # __byte_perm(offsets, 0, 0x4440 + c)
        lo, hi = fp8_tables(byte)
        regs[..., step, half], regs[..., step, half + 2] = decode_word_fp8(codes[..., c], lo, hi)
    return regs


# ---------------------------------------------------------------------------------------------
# the fragment: CuTe's ALayout_64x32 (8-bit A of m64nNk32), (thread, value) -> (row, k)
# ---------------------------------------------------------------------------------------------


def cute_a_fragment(tid: int, value: int) -> tuple[int, int]:
    """Layout<Shape<Shape<_4,_8,_4>, Shape<_4,_2,_2>>, Stride<Stride<_256,_1,_16>, Stride<_64,_8,_1024>>>
    of an M = 64 x K = 32 tile stored column-major (index = row + 64 k); value = 4 register + byte."""
    t, g, w = tid % 4, (tid // 4) % 8, tid // 32
    v0, v1, v2 = value % 4, (value // 4) % 2, value // 8
    index = 256 * t + 1 * g + 16 * w + 64 * v0 + 8 * v1 + 1024 * v2
    return index % 64, index // 64


def _fragment_positions() -> tuple[np.ndarray, np.ndarray]:
    """For (tid, step, register, byte): its atom index row * 64 + k, and the flattened (tid, step, reg, byte)."""
    positions = np.zeros((128, 2, 4, 4), dtype=np.int64)
    for tid in range(128):
        for step in range(2):
            for register in range(4):
                for byte in range(4):
                    row, k = cute_a_fragment(tid, 4 * register + byte)
                    positions[tid, step, register, byte] = row * ATOM_K + 32 * step + k
    return positions


POSITIONS = _fragment_positions()


def model_decode(packed: mxfp4.PackedMXFP4FP8) -> torch.Tensor:
    """The kernel's A operand of an FP8-ready weight: e4m3 bytes int64 ``[E, N, K]``."""
    data = packed.data.numpy()
    experts, n_atoms, k_atoms = data.shape[:3]
    codes = np.ascontiguousarray(data[..., :ATOM_CODE_BYTES]).view("<u4").reshape(experts, n_atoms, k_atoms, 128, 4)
    offset_words = np.ascontiguousarray(data[..., ATOM_CODE_BYTES:]).view("<u4")
    thread_word = np.array([layout.scale_word_of_thread(tid) for tid in range(128)])
    regs = decode_atoms(codes.astype(U32), offset_words[..., thread_word].astype(U32))  # [E, Na, Ka, 128, 2, 4]
    byte_values = np.stack([(regs >> U32(8 * b)) & U32(0xFF) for b in range(4)], axis=-1)  # [..., 128, 2, 4, 4]
    atoms = np.zeros((experts, n_atoms, k_atoms, ATOM_N * ATOM_K), dtype=np.int64)
    atoms[..., POSITIONS.reshape(-1)] = byte_values.reshape(experts, n_atoms, k_atoms, -1)
    full = atoms.reshape(experts, n_atoms, k_atoms, ATOM_N, ATOM_K).transpose(0, 1, 3, 2, 4)
    full = full.reshape(experts, n_atoms * ATOM_N, k_atoms * ATOM_K)[:, : packed.n, : packed.k]
    return torch.from_numpy(np.ascontiguousarray(full))


def expected_bytes(w: MXFP4Tensor) -> torch.Tensor:
    """e4m3 bytes of weight / 2^(R - 127 - 6), R = each row's largest scale byte: from the source alone."""
    reference = w.scales.to(torch.int32).amax(dim=-1, keepdim=True)
    scaled = mxfp4.dequantize(w, torch.float64) / torch.exp2((reference - 127 - layout.FP8_WEIGHT_SHIFT).double())
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)


def assert_bytes_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    differ = got != expected
    assert not bool(differ.any()), (
        f"{what}: {int(differ.sum())} bytes differ; first at (e, n, k) = {differ.nonzero()[0].tolist()}: "
        f"got {int(got[differ][0]):#04x}, expected {int(expected[differ][0]):#04x}"
    )


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def every_code_at_every_offset(references: list[int], seed: int) -> MXFP4Tensor:
    """Rows r with 12 blocks at offsets t = 0..11 below references[r], each block every code twice, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    rows, blocks = len(references), layout.FP8_MAX_OFFSET + 1
    codes = torch.arange(16, dtype=torch.uint8).repeat(rows, 2 * blocks)
    order = torch.argsort(torch.rand(rows, blocks, 32, generator=generator), dim=-1)
    codes = torch.gather(codes.view(rows, blocks, 32), 2, order).view(rows, -1)
    scales = torch.tensor(references, dtype=torch.int32).unsqueeze(1) - torch.arange(blocks)
    return MXFP4Tensor.from_codes(codes.unsqueeze(0), scales.to(torch.uint8).unsqueeze(0))


def test_every_code_at_every_offset_decodes_to_its_e4m3_value(seed: int) -> None:
    # references from 11 (the last block has scale byte 0) to 254 (the largest finite one), 64 + 3 rows
    references = torch.randint(11, 255, (67,), generator=torch.Generator().manual_seed(seed)).tolist()
    references[:3] = [11, 127, 254]
    w = every_code_at_every_offset(references, seed)
    packed = mxfp4.pack(w, activations="fp8")
    assert packed.rerounded_blocks == 0
    assert_bytes_equal(model_decode(packed), expected_bytes(w), f"every code x every offset, seed {seed}")


@pytest.mark.parametrize(("e", "n", "k"), [(2, 200, 96), (1, 130, 160), (3, 64, 64)])
def test_random_weights_with_tails(e: int, n: int, k: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, generator=generator)
    base = torch.randint(20, 240, (e, n, 1), generator=generator)
    scales = (base - torch.randint(0, layout.FP8_MAX_OFFSET + 1, (e, n, k // 32), generator=generator)).to(torch.uint8)
    w = MXFP4Tensor(blocks, scales)
    packed = mxfp4.pack(w, activations="fp8")
    assert_bytes_equal(model_decode(packed), expected_bytes(w), f"E={e} N={n} K={k}, seed {seed}")


def test_rerounded_blocks_decode_to_their_rerounded_values(seed: int) -> None:
    """Blocks more than 2^11 below their row's largest: the decode reads the re-rounded codes at t = 11."""
    x = torch.randn(1, 64, 128, generator=torch.Generator().manual_seed(seed))
    x[..., 32:64] *= 2.0**-14  # t = 14 or so: re-rounded
    w = mxfp4.quantize(x)
    packed = mxfp4.pack(w, activations="fp8")
    assert packed.rerounded_blocks > 0
    assert_bytes_equal(model_decode(packed), expected_bytes(mxfp4.unpack(packed)), f"re-rounded, seed {seed}")


def test_padding_decodes_to_zero() -> None:
    w = mxfp4.quantize(torch.randn(1, 10, 32))
    packed = mxfp4.pack(w, activations="fp8")
    full = mxfp4.PackedMXFP4FP8(packed.data, packed.row_scale, ATOM_N, ATOM_K)
    got = model_decode(full)
    assert int(got[0, 10:].count_nonzero()) == 0 and int(got[0, :, 32:].count_nonzero()) == 0


def test_prmt_model_replicates_signs_and_ignores_the_high_half() -> None:
    lo, hi = U32(0x83020100), U32(0x87068504)
    assert int(prmt(lo, hi, U32(0x3210))) == 0x83020100
    assert int(prmt(lo, hi, U32(0xFFFF7654))) == 0x87068504  # bits 16..31 are not read
    # nibbles D, 0, B, 5: byte 5 (0x85) sign-replicated, byte 0 copied, byte 3 (0x83) replicated, byte 5 copied
    assert int(prmt(lo, hi, U32(0x5B0D))) == 0x85FF00FF
    assert int(prmt(lo, hi, U32(0x000A))) == 0x00000000  # byte 2 (0x02) replicated: a positive byte gives 0


def test_tables_are_the_e4m3_magnitudes_at_every_offset() -> None:
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    for t in range(layout.FP8_MAX_OFFSET + 1):
        lo, hi = fp8_tables(np.array([layout.FP8_OFFSET_STEP * t], dtype=U32))
        got = [(int(lo[0]) >> (8 * i)) & 0xFF for i in range(4)] + [(int(hi[0]) >> (8 * i)) & 0xFF for i in range(4)]
        want = (magnitudes * 2.0 ** (layout.FP8_WEIGHT_SHIFT - t)).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
        assert got == want, t
        assert all(0x08 <= byte <= 0x7E for byte in got[1:]), "every nonzero table value is a normal e4m3"


def test_the_kernel_fragment_is_the_layout_contract() -> None:
    """mxfp4/format/layout.py's word / slot placement agrees with CuTe's fragment (via the decode's register order)."""
    for tid in range(128):
        for word in range(4):
            step, half = word >> 1, word & 1
            for slot in range(8):
                register, byte = half + 2 * (slot >> 2), slot & 3
                row, k = cute_a_fragment(tid, 4 * register + byte)
                assert layout.fp8_code_position(tid, word, slot) == (row, 32 * step + k)


def test_header_does_the_modelled_ops() -> None:
    """The model above replays these lines; a change to the header must change the model too."""
    text = (TEMPLATES_DIR / "mxfp4_decode_fp8.cuh").read_text()
    for line in (
        "return {kFp8TableLo - offset_byte * 0x01010100u, kFp8TableHi - offset_byte * 0x01010101u};",
        "uint32_t const index = word & static_cast<uint32_t>(kFp8IndexMask);",
        "low = prmt(tables.lo, tables.hi, index) | ((word << kFp8SignShift) & kE4M3SignBits);",
        "high = prmt(tables.lo, tables.hi, index >> 16) | (word & kE4M3SignBits);",
        'asm("prmt.b32 %0, %1, %2, %3;"',
        "constexpr uint32_t kE4M3SignBits = 0x80808080u;",
        "fp8_tables(__byte_perm(offsets, 0u, 0x4440u + c));",
        "decode_word_fp8(words[c], tables, a[step][half], a[step][half + 2]);",
    ):
        assert line in text, line
    source = (TEMPLATES_DIR / "mxfp4_grouped_mm_sm90.cuh").read_text()
    assert "decode_atom_fp8(codes[a], scales[a], frag[Buf][a]);" in source
