"""MXFP4 format: exact decode of every (code, scale), the OCP quantization rules, error bounds."""

from __future__ import annotations

import math

import pytest
import torch

import mxfp4
from mxfp4.format.tensor import MXFP4Tensor


def e2m1_value(code: int) -> float:
    """Independent E2M1 decode from the bit fields: sign, 2 exponent bits (bias 1), 1 mantissa bit."""
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    if exponent == 0:
        return sign * mantissa * 0.5  # subnormal: 0 or 0.5
    return sign * (1.0 + mantissa / 2.0) * 2.0 ** (exponent - 1)


def mx_value(code: int, scale: int) -> float:
    if scale == 0xFF:
        return math.nan
    return math.ldexp(e2m1_value(code), scale - 127)


def one_block_tensor(codes: list[int], scale: int) -> MXFP4Tensor:
    return MXFP4Tensor.from_codes(torch.tensor(codes, dtype=torch.uint8), torch.tensor([scale], dtype=torch.uint8))


def all_codes_all_scales() -> MXFP4Tensor:
    """Row s: scale byte s; its 32 values are the 16 codes twice."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(256, 2)
    return MXFP4Tensor.from_codes(codes, torch.arange(256, dtype=torch.uint8).unsqueeze(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_every_code_and_scale_decodes_exactly(dtype: torch.dtype) -> None:
    decoded = mxfp4.dequantize(all_codes_all_scales(), dtype)
    assert decoded.dtype == dtype and decoded.shape == (256, 32)
    expected = torch.tensor(
        [[mx_value(c % 16, s) for c in range(32)] for s in range(256)], dtype=torch.float64
    ).to(dtype)  # float64 is exact; the cast gives +-inf only where dtype overflows
    assert torch.equal(decoded.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(decoded[finite], expected[finite])
    # Signs of zeros too (code 8 is -0).
    assert torch.equal(torch.signbit(decoded[finite]), torch.signbit(expected[finite]))


def test_smallest_scale_is_an_exact_float32_subnormal() -> None:
    decoded = mxfp4.dequantize(one_block_tensor([1, 2, 3, 15] + [0] * 28, 0), torch.float32)
    assert decoded[:4].tolist() == [2.0**-128, 2.0**-127, 1.5 * 2.0**-127, -6 * 2.0**-127]


def test_nan_scale_decodes_to_nan() -> None:
    decoded = mxfp4.dequantize(one_block_tensor(list(range(16)) * 2, 0xFF), torch.float32)
    assert bool(decoded.isnan().all())


def scale_byte(t: MXFP4Tensor) -> int:
    return int(t.scales.reshape(-1)[0])


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (0.25, 0),  # tie between 0 and 0.5 -> 0 (even)
        (0.2500001, 1),
        (0.75, 2),  # tie between 0.5 and 1 -> 1
        (1.25, 2),  # tie between 1 and 1.5 -> 1
        (1.75, 4),  # tie between 1.5 and 2 -> 2
        (2.5, 4),  # tie between 2 and 3 -> 2
        (3.5, 6),  # tie between 3 and 4 -> 4
        (5.0, 6),  # tie between 4 and 6 -> 4
        (5.0000005, 7),
        (-0.75, 10),
        (-5.0, 14),
    ],
)
def test_round_to_nearest_even(value: float, code: int) -> None:
    # The block's amax is 6 (exponent 2, shared exponent 0, scale byte 127): values are unscaled.
    t = mxfp4.quantize(torch.tensor([value, 6.0] + [0.0] * 30, dtype=torch.float32))
    assert scale_byte(t) == 127
    assert int(t.codes()[0]) == code


def test_grid_points_are_exact_at_every_scale() -> None:
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 6] * 2, dtype=torch.float64)
    for exponent in (-127, -100, -1, 0, 1, 60, 125):
        w = grid * 2.0**exponent
        t = mxfp4.quantize(w)
        assert scale_byte(t) == exponent + 127
        assert torch.equal(mxfp4.dequantize(t, torch.float64), w)


def test_shared_exponent_is_floor_log2_amax_minus_2() -> None:
    # Just below and at powers of two: a float log2 could round 2**k - ulp up to k.
    for amax in (1.0, math.nextafter(2.0, 0.0), 2.0, math.nextafter(1024.0, 0.0), 3.0, 7.99, 0.1):
        t = mxfp4.quantize(torch.tensor([amax] + [0.0] * 31, dtype=torch.float64))
        floor_log2 = math.frexp(amax)[1] - 1  # exact, unlike math.log2 near powers of two
        assert scale_byte(t) == floor_log2 - 2 + 127, amax


def test_amax_just_below_power_of_two_saturates_to_6() -> None:
    # amax = 8 - ulp: exponent 2 -> shared 0; 7.99 / 1 is past 6 and saturates.
    t = mxfp4.quantize(torch.tensor([math.nextafter(8.0, 0.0), -7.0] + [0.0] * 30, dtype=torch.float64))
    assert scale_byte(t) == 127
    assert t.codes()[:2].tolist() == [7, 15]


def test_scale_clamps_to_e8m0_range() -> None:
    tiny = torch.tensor([2.0**-140] + [0.0] * 31, dtype=torch.float64)
    assert scale_byte(mxfp4.quantize(tiny)) == 0  # 2**-142 clamps to 2**-127; the value rounds to 0
    huge = torch.tensor([2.0**200, -(2.0**131)] + [0.0] * 30, dtype=torch.float64)
    t = mxfp4.quantize(huge)
    assert scale_byte(t) == 254  # 2**198 clamps to 2**127; both saturate to +-6
    assert t.codes()[:2].tolist() == [7, 15]


def test_zero_blocks() -> None:
    w = torch.zeros(3, 64)
    w[1, 1] = -0.0
    w[2, 40] = 1.0
    t = mxfp4.quantize(w)
    assert t.scales[:, 0].tolist() == [0, 0, 0]  # no exponent: the E8M0 clamp
    assert int(t.blocks[:2].max()) == 0 and int(t.blocks[2, 0].max()) == 0
    assert torch.equal(mxfp4.dequantize(t, torch.float32), w.abs() * (w > 0))


def test_small_negatives_round_to_plus_zero() -> None:
    t = mxfp4.quantize(torch.tensor([-0.1, -0.25, 4.0] + [0.0] * 29))
    assert t.codes()[:3].tolist() == [0, 0, 6]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_with_its_index(bad: float) -> None:
    w = torch.randn(3, 5, 64)
    w[2, 1, 33] = bad
    w[2, 4, 0] = bad
    with pytest.raises(ValueError, match=r"element \(2, 1, 33\)"):
        mxfp4.quantize(w)


def test_a_meta_tensor_quantizes_to_shapes_on_meta() -> None:
    """No values, so no finiteness check (it used to fail inside Tensor.item()): shapes and dtypes, as on the CPU."""
    cpu = mxfp4.quantize(torch.randn(3, 5, 64, dtype=torch.bfloat16))
    meta = mxfp4.quantize(torch.empty(3, 5, 64, dtype=torch.bfloat16, device="meta"))
    assert meta.device.type == "meta" and meta.shape == cpu.shape
    assert (meta.blocks.shape, meta.blocks.dtype, meta.scales.shape, meta.scales.dtype) == (
        cpu.blocks.shape, cpu.blocks.dtype, cpu.scales.shape, cpu.scales.dtype)
    packed = mxfp4.pack(meta)
    assert packed.device.type == "meta" and packed.data.shape == mxfp4.pack(cpu).data.shape


def test_k_not_multiple_of_32_raises() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.randn(4, 48))


def test_bad_types_raise() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        mxfp4.quantize(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="MXFP4Tensor"):
        mxfp4.dequantize(torch.ones(4, 32))
    t = mxfp4.quantize(torch.randn(2, 32))
    for dtype in ("bfloat16", torch.int32, None):
        with pytest.raises(TypeError, match=r"dequantize: dtype must be a floating-point torch.dtype"):
            mxfp4.dequantize(t, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_roundtrip_error_bound(dtype: torch.dtype, seed: int) -> None:
    w = (torch.randn(8, 256, dtype=torch.float64) * 3.0).to(dtype)
    t = mxfp4.quantize(w)
    back = mxfp4.dequantize(t, torch.float64)
    w64 = w.double()
    # Per element: half a grid step at the block's scale, the step being at most 2 * 2**X
    # (X = shared exponent), so |error| <= 2**X <= amax / 4.
    amax = w64.view(8, 8, 32).abs().amax(-1, keepdim=True)
    err = (back - w64).abs().view(8, 8, 32)
    assert bool((err <= amax / 4).all()), f"seed {seed}"
    rel = float((back - w64).norm() / w64.norm())
    assert rel < 0.2, f"seed {seed}: relative error {rel}"


def test_quantize_is_idempotent_on_its_own_output(seed: int) -> None:
    t = mxfp4.quantize(torch.randn(4, 16, 128))
    again = mxfp4.quantize(mxfp4.dequantize(t, torch.float32))
    assert torch.equal(mxfp4.dequantize(again, torch.float32), mxfp4.dequantize(t, torch.float32)), f"seed {seed}"


def test_quantize_matches_brute_force_nearest_even(seed: int) -> None:
    w = torch.randn(64, 32, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64).unsqueeze(1)
    t = mxfp4.quantize(w)
    grid = [e2m1_value(code) for code in range(8)]
    for row in range(64):
        amax = float(w[row].abs().max())
        shared = max(-127, min(127, math.frexp(amax)[1] - 1 - 2))
        assert int(t.scales[row, 0]) == shared + 127
        for col in range(32):
            v = float(w[row, col]) / 2.0**shared
            mag = min(abs(v), 6.0)
            best = min(range(8), key=lambda c: (abs(grid[c] - mag), c % 2))  # nearest, ties to even code
            code = best | (8 if v < 0 and best else 0)
            assert int(t.codes()[row, col]) == code, f"seed {seed}: row {row} col {col} value {v}"


def test_large_tensor_is_chunked_consistently(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    from mxfp4.format import codec as module

    w = torch.randn(10, 96)
    whole = mxfp4.quantize(w)
    monkeypatch.setattr(module, "_CHUNK_VALUES", 96 * 3)  # 3 rows at a time
    chunked = mxfp4.quantize(w)
    assert torch.equal(chunked.blocks, whole.blocks) and torch.equal(chunked.scales, whole.scales)
    assert torch.equal(mxfp4.dequantize(chunked), mxfp4.dequantize(whole))
    w[7, 50] = float("nan")
    with pytest.raises(ValueError, match=r"element \(7, 50\)"):
        mxfp4.quantize(w)
