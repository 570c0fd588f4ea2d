"""The FP8-ready layout (``mxfp4.pack(w, activations="fp8")``): round trips, the re-rounding rule and its
count, the row scales, and the docstring's tables (mxfp4/format/layout.py, "The FP8-ready layout")."""

from __future__ import annotations

import re

import pytest
import torch

import mxfp4
from mxfp4.format import layout
from mxfp4.format.layout import (
    ATOM_K,
    ATOM_N,
    FP8_CODE_BITS,
    FP8_MAX_OFFSET,
    MXFP4Tensor,
)
from mxfp4.format.layout_fp8 import decode_fp8_values, pack_fp8

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def spread_weight(e: int, n: int, k: int, spread: int, seed: int) -> MXFP4Tensor:
    """Random codes; per row a reference scale byte and blocks up to ``spread`` below it."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, generator=generator)
    base = torch.randint(spread + 1, 250, (e, n, 1), generator=generator)
    scales = base - torch.randint(0, spread + 1, (e, n, k // 32), generator=generator)
    return MXFP4Tensor(blocks, scales.to(torch.uint8))


@pytest.mark.parametrize(("e", "n", "k"), [(1, 64, 64), (2, 200, 96), (3, 130, 160), (1, 1, 32)])
def test_round_trip_is_exact_within_the_offset_range(e: int, n: int, k: int, seed: int) -> None:
    w = spread_weight(e, n, k, FP8_MAX_OFFSET, seed)
    packed = mxfp4.pack(w, activations="fp8")
    assert isinstance(packed, mxfp4.PackedMXFP4FP8) and packed.shape == (e, n, k)
    assert packed.rerounded_blocks == 0 and packed.total_blocks == e * n * k // 32
    back = mxfp4.unpack(packed)
    assert torch.equal(back.blocks, w.blocks) and torch.equal(back.scales, w.scales), f"seed {seed}"


def test_weight_is_the_e4m3_values_times_the_row_scale(seed: int) -> None:
    w = spread_weight(2, 100, 160, FP8_MAX_OFFSET, seed)
    packed = mxfp4.pack(w, activations="fp8")
    values = decode_fp8_values(packed, 0, 2, torch.float64)
    assert torch.equal(values.to(torch.float8_e4m3fn).double(), values), "every value is an e4m3 number"
    nonzero = values[values != 0].abs()
    assert bool((nonzero >= 2.0**-6).all() and (nonzero <= 384).all()), "and a normal one, below 448"
    reference = w.scales.to(torch.int64).amax(dim=-1)
    assert torch.equal(packed.row_scale[:, :100].double(), torch.exp2((reference - 127 - 6).double()))
    assert torch.equal(values * packed.row_scale[:, :100, None].double(), mxfp4.dequantize(w, torch.float64))
    assert bool((packed.row_scale[:, 100:] == 0).all()), "padding rows have row scale 0"


def rerounded_reference(w: MXFP4Tensor) -> tuple[torch.Tensor, int]:
    """float64 values of the rule, written from the docstring: a block more than 2^11 below its row's largest
    is rounded (nearest, ties to even) onto the E2M1 grid times 2^(R - 11 - 127); the count of such blocks
    with a nonzero code."""
    values = mxfp4.dequantize(w, torch.float64).view(*w.scales.shape, 32)
    reference = w.scales.to(torch.int64).amax(dim=-1, keepdim=True)
    far = (reference - w.scales.to(torch.int64)) > FP8_MAX_OFFSET
    step = torch.exp2((reference - FP8_MAX_OFFSET - 127).double()).unsqueeze(-1)
    scaled = (values / step).abs()
    # nearest grid point, ties to the even code (codes 0, 2, 4, 6 are even: 0, 1, 2, 4)
    distance = (scaled.unsqueeze(-1) - E2M1_GRID).abs()
    best = distance.min(dim=-1, keepdim=True).values
    candidates = (distance == best) * (1 + (torch.arange(8) % 2 == 0))  # prefer the even code on a tie
    rounded = E2M1_GRID[candidates.argmax(dim=-1)] * step * values.sign()
    count = int((far & (values != 0).any(dim=-1)).sum())
    return torch.where(far.unsqueeze(-1), rounded, values).view(w.scales.shape[:-1] + (-1,)), count


def test_far_blocks_are_rerounded_and_counted(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 64, 256, generator=generator)
    x[..., 32:64] *= 2.0**-12  # about 12 below: some blocks past 11
    x[..., 64:96] *= 2.0**-15  # far below: many codes round away to zero
    x[..., 96:128] = 0.0  # an all-zero block is never counted
    x[..., 128:160] *= 2.0**-40  # so far that every value rounds to zero: counted (it had nonzero codes)
    w = mxfp4.quantize(x)
    packed = mxfp4.pack(w, activations="fp8")
    expected, count = rerounded_reference(w)
    assert count > 0 and packed.rerounded_blocks == count
    got = mxfp4.dequantize(mxfp4.unpack(packed), torch.float64)
    assert torch.equal(got, expected), f"seed {seed}: {int((got != expected).sum())} values differ"
    assert f"re-rounded blocks {count} of {packed.total_blocks}" in repr(packed)


def test_a_nan_block_makes_its_row_nan() -> None:
    w = mxfp4.quantize(torch.randn(1, 3, 64))
    scales = w.scales.clone()
    scales[0, 1, 1] = 0xFF
    packed = mxfp4.pack(MXFP4Tensor(w.blocks, scales), activations="fp8")
    assert bool(packed.row_scale[0, 1].isnan()) and not bool(packed.row_scale[0, [0, 2]].isnan().any())
    assert bool((mxfp4.unpack(packed).scales[0, 1] == 0xFF).all())


def test_gate_up_fp8_pairs_rows_and_unpacks_back(seed: int) -> None:
    w = spread_weight(2, 32, 64, 5, seed)
    paired = mxfp4.pack_gate_up(w, activations="fp8")
    assert isinstance(paired, mxfp4.PackedGateUpFP8) and isinstance(paired, mxfp4.PackedMXFP4FP8)
    back = mxfp4.unpack_gate_up(paired)
    assert torch.equal(back.blocks, w.blocks) and torch.equal(back.scales, w.scales)
    assert isinstance(paired.to("cpu"), mxfp4.PackedGateUpFP8)


def test_pack_checks_activations_and_weight() -> None:
    w = mxfp4.quantize(torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match=r"pack: activations must be one of \('bf16', 'fp8'\), got 'fp16'"):
        mxfp4.pack(w, activations="fp16")
    with pytest.raises(TypeError, match="activations must be a str"):
        mxfp4.pack(w, activations=8)
    with pytest.raises(TypeError, match="pack: weight must be an MXFP4Tensor"):
        mxfp4.pack(torch.zeros(1, 8, 32), activations="fp8")
    assert isinstance(mxfp4.pack(w), mxfp4.PackedMXFP4)  # the default stays the plain layout


def test_empty_rows_pack_to_an_empty_result() -> None:
    w = MXFP4Tensor(torch.zeros(2, 0, 1, 16, dtype=torch.uint8), torch.zeros(2, 0, 1, dtype=torch.uint8))
    packed = pack_fp8(w)
    assert packed.data.shape == (2, 0, 1, layout.ATOM_BYTES) and packed.row_scale.shape == (2, 0)


def test_constructor_checks_shapes() -> None:
    packed = mxfp4.pack(mxfp4.quantize(torch.randn(1, 8, 32)), activations="fp8")
    with pytest.raises(ValueError, match="row_scale must be contiguous"):
        mxfp4.PackedMXFP4FP8(packed.data, packed.row_scale[:, :8].contiguous(), 8, 32)
    with pytest.raises(TypeError, match="row_scale must be a float32"):
        mxfp4.PackedMXFP4FP8(packed.data, packed.row_scale.double(), 8, 32)


# ---------------------------------------------------------------------------------------------
# the contract as written


def test_code_bits_are_the_docstring_table() -> None:
    table = {}
    for match in re.finditer(r"fp8 slot (\d): \(\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\)", layout.__doc__ or ""):
        table[int(match.group(1))] = tuple(int(v) for v in match.groups()[1:])
    assert [table[slot] for slot in range(8)] == list(FP8_CODE_BITS)
    assert sorted(p for bits in FP8_CODE_BITS for p in bits) == list(range(32)), "every bit of a word once"
    for slot, (m, e0, e1, sign) in enumerate(FP8_CODE_BITS):
        register_half, byte = slot >> 2, slot & 3
        assert (m, e0, e1) == tuple(16 * register_half + 4 * byte + b for b in range(3)), "a PRMT selector nibble"
        assert sign == 8 * byte + 7 - (layout.FP8_SIGN_SHIFT if register_half == 0 else 0), "bit 7 after the shift"


def test_code_positions_cover_the_atom_once() -> None:
    seen = {layout.fp8_code_position(tid, word, slot) for tid in range(128) for word in range(4) for slot in range(8)}
    assert seen == {(row, k) for row in range(ATOM_N) for k in range(ATOM_K)}


def test_tables_are_the_docstring_values() -> None:
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]) * 2.0**layout.FP8_WEIGHT_SHIFT
    encoded = values.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    assert layout.FP8_TABLE_LO == int.from_bytes(bytes(encoded[:4]), "little")
    assert layout.FP8_TABLE_HI == int.from_bytes(bytes(encoded[4:]), "little")
    assert layout.FP8_OFFSET_STEP == 8, "one step of the e4m3 exponent field (its lowest bit is bit 3)"
    assert layout.FP8_INDEX_MASK == 0x77777777 and layout.FP8_SIGN_MASK == 0x80808080
