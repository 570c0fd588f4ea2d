"""The packed Hopper layout: round trips with tails, and bytes that match the layout docstring."""

from __future__ import annotations

import numpy
import pytest
import torch

import mxfp4
from mxfp4.format import layout
from mxfp4.format.layout import (
    ATOM_BYTES,
    ATOM_CODE_BYTES,
    ATOM_K,
    ATOM_N,
    CODE_BITS,
    code_bit_position,
    code_position,
    scale_position,
)
from mxfp4.format.tensor import MXFP4Tensor


def random_weight(e: int, n: int, k: int) -> MXFP4Tensor:
    """Every code and scale byte (0xFF included) appears: the layout is a byte permutation."""
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8)
    scales = torch.randint(0, 256, (e, n, k // 32), dtype=torch.uint8)
    return MXFP4Tensor(blocks, scales)


@pytest.mark.parametrize(("e", "n", "k"), [(1, 1, 32), (3, 200, 96), (2, 64, 64), (2, 130, 160), (1, 65, 544)])
def test_pack_unpack_roundtrip(e: int, n: int, k: int, seed: int) -> None:
    w = random_weight(e, n, k)
    packed = mxfp4.pack(w)
    assert packed.shape == (e, n, k)
    assert packed.data.shape == (e, -(-n // ATOM_N), -(-k // ATOM_K), ATOM_BYTES)
    back = mxfp4.unpack(packed)
    assert torch.equal(back.blocks, w.blocks) and torch.equal(back.scales, w.scales), f"seed {seed}"


def test_pack_of_2d_weight_is_one_expert(seed: int) -> None:
    w = random_weight(1, 70, 64)
    packed = mxfp4.pack(MXFP4Tensor(w.blocks[0], w.scales[0]))
    assert packed.num_experts == 1
    assert torch.equal(packed.data, mxfp4.pack(w).data)


def test_unpack_experts_slices(seed: int) -> None:
    w = random_weight(5, 100, 96)
    part = layout.unpack_experts(mxfp4.pack(w), 1, 4)
    assert torch.equal(part.blocks, w.blocks[1:4]) and torch.equal(part.scales, w.scales[1:4])


def test_chunked_pack_matches(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    w = random_weight(5, 64, 128)
    whole = mxfp4.pack(w).data
    monkeypatch.setattr(layout, "_CHUNK_VALUES", 64 * 128 * 2)  # two experts at a time
    assert torch.equal(mxfp4.pack(w).data, whole)


def test_packed_bytes_follow_the_docstring(seed: int) -> None:
    """Recompute a few bytes from the documented formulas, independently of pack's index tables."""
    e, n, k = 2, 200, 96  # tails in both N (200 = 3*64 + 8) and K (96 = 64 + 32)
    w = random_weight(e, n, k)
    codes = w.codes()  # [E, N, K], one code per byte
    data = mxfp4.pack(w).data

    def code_at(expert: int, row: int, col: int) -> int:
        return int(codes[expert, row, col]) if row < n and col < k else 0  # padding is code 0

    def scale_at(expert: int, row: int, kblock: int) -> int:
        return int(w.scales[expert, row, kblock]) if row < n and kblock < k // 32 else 0

    generator = torch.Generator().manual_seed(seed)
    for _ in range(200):
        expert, n_atom, k_atom = (int(torch.randint(0, size, (), generator=generator)) for size in (e, 4, 2))
        tid, word, slot = (int(torch.randint(0, size, (), generator=generator)) for size in (128, 4, 8))
        row, col = code_position(tid, word, slot)
        # Spelled out from the docstring: w = tid // 32, g = (tid % 32) // 4, t = tid % 4.
        wg, g, t = tid // 32, (tid % 32) // 4, tid % 4
        assert row == 16 * wg + g + 8 * (slot & 1)
        assert col == 16 * word + 2 * t + 8 * ((slot >> 1) & 1) + (slot >> 2)
        # The slot's code bits (m, e0, e1, s) at the docstring's bit positions of the little-endian word.
        first = 16 * tid + 4 * word
        packed_word = int.from_bytes(bytes(data[expert, n_atom, k_atom, first : first + 4].tolist()), "little")
        got = sum(((packed_word >> position) & 1) << bit for bit, position in enumerate(DOCSTRING_CODE_BITS[slot]))
        assert got == code_at(expert, ATOM_N * n_atom + row, ATOM_K * k_atom + col)

        sword, sbyte = int(torch.randint(0, 32, (), generator=generator)), int(torch.randint(0, 4, (), generator=generator))
        srow, kblock = scale_position(sword, sbyte)
        assert (srow, kblock) == (16 * (sword // 8) + sword % 8 + 8 * (sbyte & 1), sbyte >> 1)
        got_scale = int(data[expert, n_atom, k_atom, ATOM_CODE_BYTES + 4 * sword + sbyte])
        assert got_scale == scale_at(expert, ATOM_N * n_atom + srow, 2 * k_atom + kblock)


# The table of the docstring ("slot i's bits (m, e0, e1, s) are at CODE_BITS[i]"), copied by hand.
DOCSTRING_CODE_BITS = (
    (6, 7, 8, 15), (28, 29, 30, 5), (0, 1, 2, 9), (26, 3, 4, 11),
    (22, 23, 24, 31), (12, 13, 14, 21), (16, 17, 18, 25), (10, 19, 20, 27),
)


def test_code_bits_are_the_docstring_table() -> None:
    assert CODE_BITS == DOCSTRING_CODE_BITS
    diagram = {}  # the docstring's bit diagram: "holds" rows under "bit" rows
    lines = (layout.__doc__ or "").splitlines()
    for bits_line, holds_line in zip(lines, lines[1:]):
        if bits_line.strip().startswith("bit ") and holds_line.strip().startswith("holds"):
            diagram.update(zip(map(int, bits_line.split()[1:]), holds_line.split()[1:]))
    assert sorted(diagram) == list(range(32))
    for slot, positions in enumerate(CODE_BITS):
        for field, position in zip(("m", "e0", "e1", "s"), positions):
            assert diagram[position] == f"{slot}.{field}"


def test_code_positions_cover_the_atom_once() -> None:
    seen = {code_position(tid, word, slot) for tid in range(128) for word in range(4) for slot in range(8)}
    assert len(seen) == ATOM_N * ATOM_K
    scales = {scale_position(word, byte) for word in range(32) for byte in range(4)}
    assert len(scales) == ATOM_N * 2


def test_every_code_bit_is_placed_exactly_once() -> None:
    """Every (tid, word, bit) of the atom's codes holds one bit of one code, and each code bit has one home."""
    homes = [code_bit_position(tid, word, bit) for tid in range(128) for word in range(4) for bit in range(32)]
    assert len(set(homes)) == len(homes) == ATOM_N * ATOM_K * 4
    assert {(row, k) for row, k, _ in homes} == {(row, k) for row in range(ATOM_N) for k in range(ATOM_K)}
    assert {bit for _, _, bit in homes} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="bit"):
        code_bit_position(0, 0, 32)


def test_decode_pieces_rebuild_each_slot_as_a_bf16_half() -> None:
    """Register j = OR of rotl(word, r) & mask: slot j's bits land at BF16_CODE_BITS, slot j + 4's 16 higher."""
    for register, pieces in enumerate(layout.DECODE_PIECES):
        masks = [mask for _, mask in pieces]
        assert sum(masks) == 0x81C0 and all(a & b == 0 for i, a in enumerate(masks) for b in masks[i + 1 :])
        for half in (0, 1):
            for bit, target in enumerate(layout.BF16_CODE_BITS):
                (rotate,) = [r for r, mask in pieces if (mask >> target) & 1]
                source = CODE_BITS[register + 4 * half][bit]
                assert (source + rotate) % 32 == target + 16 * half


def test_padding_decodes_to_zero(seed: int) -> None:
    w = mxfp4.quantize(torch.randn(1, 10, 32))
    packed = mxfp4.pack(w)
    # N padded 10 -> 64 and K 32 -> 64: the whole padded atom decodes to exact zeros.
    full = layout.unpack_experts(layout.PackedMXFP4(packed.data, 64, 64), 0, 1)
    values = mxfp4.dequantize(full, torch.float32)[0]
    assert torch.equal(values[:10, :32], mxfp4.dequantize(w, torch.float32)[0])
    assert int(values[10:].count_nonzero()) == 0 and int(values[:, 32:].count_nonzero()) == 0


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="MXFP4Tensor"):
        mxfp4.pack(torch.zeros(2, 64, 64))
    with pytest.raises(TypeError, match="PackedMXFP4"):
        mxfp4.unpack(random_weight(1, 64, 64))


@pytest.mark.parametrize(("e", "n", "k"), [(0, 64, 64), (2, 0, 64), (0, 0, 32), (3, 0, 96)])
def test_empty_experts_or_rows_pack_to_an_empty_result(e: int, n: int, k: int) -> None:
    w = random_weight(e, n, k)
    packed = mxfp4.pack(w)
    assert packed.shape == (e, n, k) and packed.data.numel() == 0
    assert packed.data.shape == (e, -(-n // ATOM_N), -(-k // ATOM_K), ATOM_BYTES)
    back = mxfp4.unpack(packed)
    assert back.shape == (e, n, k) and torch.equal(back.blocks, w.blocks) and torch.equal(back.scales, w.scales)
    assert mxfp4.dequantize(back).shape == (e, n, k)
    if e:  # a 2-D weight with no rows is one empty expert
        assert mxfp4.pack(MXFP4Tensor(w.blocks[0], w.scales[0])).shape == (1, n, k)


def test_an_empty_k_is_a_clear_value_error() -> None:
    """K = 0 holds no block: the tensor says so (naming blocks), as quantize and the ops do."""
    with pytest.raises(ValueError, match="blocks must hold at least one block of 32 along K"):
        MXFP4Tensor(torch.zeros((2, 64, 0, 16), dtype=torch.uint8), torch.zeros((2, 64, 0), dtype=torch.uint8))
    with pytest.raises(ValueError, match="k positive"):
        layout.PackedMXFP4(torch.zeros((2, 1, 0, ATOM_BYTES), dtype=torch.uint8), 64, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        layout.PackedMXFP4(torch.zeros((2, 0, 1, ATOM_BYTES), dtype=torch.uint8), -1, 64)


@pytest.mark.parametrize("n, k, message", [
    ("64", 64, "n must be an int, got str '64'"), (64, "64", "k must be an int, got str '64'"),
    (64.0, 64, "n must be an int, got float 64.0"), (64, True, "k must be an int, got bool True"),
])
def test_sizes_that_are_not_ints_are_a_type_error_naming_them(n: object, k: object, message: str) -> None:
    data = torch.zeros((2, 1, 1, ATOM_BYTES), dtype=torch.uint8)
    with pytest.raises(TypeError, match=f"^PackedMXFP4: {message}$"):
        layout.PackedMXFP4(data, n, k)
    fp8 = mxfp4.pack(mxfp4.quantize(torch.randn(2, 64, 64)), activations="fp8")
    with pytest.raises(TypeError, match=f"^PackedMXFP4FP8: {message}$"):
        mxfp4.PackedMXFP4FP8(fp8.data, fp8.row_scale, n, k)
    assert layout.PackedMXFP4(data, numpy.int64(64), 64).shape == (2, 64, 64)  # numpy's integers are ints


def test_reprs_are_a_few_lines_of_shape_format_device_and_bytes() -> None:
    w = random_weight(2, 100, 128)
    packed = mxfp4.pack(w)
    for obj, name, size in ((w, "MXFP4Tensor", 2 * 100 * 4 * 17), (packed, "PackedMXFP4", packed.data.numel())):
        text = repr(obj)
        assert text.startswith(f"{name}(shape=[2, 100, 128]") and len(text.splitlines()) <= 3 and len(text) < 300
        assert "MXFP4" in text and "device=cpu" in text and f"({size} bytes)" in text
        assert "tensor(" not in text and str(obj) == text
