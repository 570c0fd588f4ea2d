"""Runs the portable Triton kernel under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``).

Not a test module: ``tests/test_portable_kernel.py`` starts this script in a subprocess, because Triton reads
``TRITON_INTERPRET`` when a kernel is defined (at import of ``mxfp4.portable.kernel``), so the normal pytest
process cannot switch to the interpreter. It prints one JSON line per case, then ``done``:
``{"case": name, "error": relative error vs float64, "nan_rows": rows left NaN, ...}``.

Usage: TRITON_INTERPRET=1 python tests/portable_interpreter.py SEED
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch


def patch_interpreter() -> None:
    """Three gaps of Triton 3.6's interpreter, patched here (test-only; the kernel's source is unchanged).

    * NumPy >= 2.4 refuses ``int()`` of a one-element 1-D array, which the interpreter calls for a scalar
      kernel argument used as a ``range`` bound (triton-lang/triton#9171).
    * ``tl.dot`` on bf16 operands multiplies the raw uint16 bit patterns (triton-lang/triton#11584): convert
      them to float32 first (exact), as the interpreter's casts already do.
    * float32 -> bf16 casts truncate and flush results below bf16's normal range to zero; the GPU rounds to
      nearest even and keeps subnormals (:func:`float32_to_bfloat16_bits`).
    * bf16 ``*`` multiplies the raw uint16 bit patterns too: multiply in float32 (exact for two bf16 values)
      and round to bf16, as the GPU's bf16 multiply does.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor

    def patch_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_tensor
    original_dot = interpreter.InterpreterBuilder.create_dot

    def as_float32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    original_convert = interpreter._convert_float

    def convert_float(values, input_dtype, output_dtype, rounding_mode):
        if (input_dtype, output_dtype) == (tl.float32, tl.bfloat16):
            return float32_to_bfloat16_bits(values)
        return original_convert(values, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert_float
    original_fmul = interpreter.InterpreterBuilder.create_fmul

    def create_fmul(self, lhs, rhs):
        if lhs.dtype.scalar != tl.bfloat16:
            return original_fmul(self, lhs, rhs)
        product = as_float32(lhs).data * as_float32(rhs).data
        return interpreter.TensorHandle(float32_to_bfloat16_bits(product), tl.bfloat16)

    interpreter.InterpreterBuilder.create_fmul = create_fmul


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even, subnormals kept, NaN kept NaN: what the GPU's conversion
    does. (The interpreter truncates and loses bf16 subnormals, which the exact-decode case needs.)"""
    bits = np.frombuffer(values.tobytes(), dtype=np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16).reshape(values.shape)


def _weight(generator: torch.Generator, experts: int, n: int, k: int):
    import mxfp4

    return mxfp4.pack(mxfp4.quantize(torch.randn(experts, n, k, generator=generator) * 0.1))


def _offsets(counts: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(dtype)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def grouped_case(generator: torch.Generator, n: int, k: int, counts: list[int], dtype: torch.dtype = torch.int32,
                 config: str | None = None) -> dict:
    """grouped_mm through the kernel against float64, output NaN-poisoned first."""
    from mxfp4.format.reference import reference_grouped_mm_float64
    from mxfp4.portable import kernel as portable_kernel

    packed = _weight(generator, len(counts), n, k)
    offsets = _offsets(counts, dtype)
    x = torch.randn(sum(counts), k, generator=generator).bfloat16()
    out = torch.full((x.shape[0], n), float("nan"), dtype=torch.bfloat16)
    chosen = portable_kernel.KernelConfig.from_name(config) if config else None
    portable_kernel.launch(x, packed.data, n, k, offsets, False, out, chosen)
    ref = reference_grouped_mm_float64(x, packed, offsets)
    return {"rel_error": _relative_error(out, ref), "nan_rows": int(out.isnan().any(dim=1).sum())}


def masked_case(generator: torch.Generator, n: int, k: int, masked: list[int], max_m: int,
                config: str | None = None) -> dict:
    """grouped_mm_masked: rows below masked_m against float64; rows at or past it are not written."""
    from mxfp4.format.reference import reference_grouped_mm_masked_float64
    from mxfp4.portable import kernel as portable_kernel

    packed = _weight(generator, len(masked), n, k)
    x = torch.randn(len(masked), max_m, k, generator=generator).bfloat16()
    out = torch.full((len(masked), max_m, n), float("nan"), dtype=torch.bfloat16)
    chosen = portable_kernel.KernelConfig.from_name(config) if config else None
    portable_kernel.launch(x, packed.data, n, k, torch.tensor(masked, dtype=torch.int32), True, out, chosen)
    ref = reference_grouped_mm_masked_float64(x, packed)
    valid = torch.arange(max_m)[None, :] < torch.tensor(masked)[:, None]  # [E, max_m]
    return {"rel_error": _relative_error(out[valid], ref[valid]), "nan_rows": int(out[valid].isnan().any(dim=1).sum()),
            "written_past_masked_m": int((~out[~valid].isnan()).any(dim=1).sum())}


def _special_scales(generator: torch.Generator, shape: tuple[int, ...], top: int) -> torch.Tensor:
    """Random E8M0 bytes in [0, top] with the edges of the decode's two factors among them."""
    scales = torch.randint(0, top + 1, shape, generator=generator, dtype=torch.uint8)
    edges = torch.tensor([0, 1, 2, 126, 127, 128, 129, top], dtype=torch.uint8)
    scales.view(-1)[: edges.numel()] = edges
    return scales


def exact_decode_case(generator: torch.Generator, n: int = 72, k: int = 96) -> dict:
    """x = identity: out[j, r] = W[r, j] exactly, for random codes and scale bytes 0..252 (no inf, no NaN)."""
    import mxfp4
    from mxfp4.portable import kernel as portable_kernel

    blocks = torch.randint(0, 256, (1, n, k // 32, 16), generator=generator, dtype=torch.uint8)
    weight = mxfp4.MXFP4Tensor(blocks, _special_scales(generator, (1, n, k // 32), 252))
    packed = mxfp4.pack(weight)
    out = torch.full((k, n), float("nan"), dtype=torch.bfloat16)
    portable_kernel.launch(torch.eye(k).bfloat16(), packed.data, n, k, _offsets([k], torch.int32), False, out)
    want = mxfp4.dequantize(weight, torch.bfloat16)[0].t()
    same = (out.view(torch.int16) == want.view(torch.int16)) | ((out == 0) & (want == 0))  # a sum turns -0 into +0
    return {"mismatches": int((~same).sum()), "values": out.numel()}


def nan_scale_case(generator: torch.Generator, n: int = 40, k: int = 64) -> dict:
    """Blocks with scale 0xFF decode to NaN: the output has NaN exactly where the float64 reference has."""
    import mxfp4
    from mxfp4.format.reference import reference_grouped_mm_float64
    from mxfp4.portable import kernel as portable_kernel

    scales = torch.randint(110, 130, (2, n, k // 32), generator=generator, dtype=torch.uint8)
    scales[0, 3, 1] = scales[1, n - 1, 0] = 0xFF
    blocks = torch.randint(0, 256, (2, n, k // 32, 16), generator=generator, dtype=torch.uint8)
    packed = mxfp4.pack(mxfp4.MXFP4Tensor(blocks, scales))
    offsets = _offsets([3, 4], torch.int32)
    x = torch.randn(7, k, generator=generator).bfloat16()
    out = torch.full((7, n), float("nan"), dtype=torch.bfloat16)
    portable_kernel.launch(x, packed.data, n, k, offsets, False, out)
    ref = reference_grouped_mm_float64(x, packed, offsets)
    finite = ~ref.isnan()
    return {"nan_pattern_differs": int((out.isnan() != ref.isnan()).sum()),
            "rel_error": _relative_error(out[finite], ref[finite])}


CASES = {
    "grouped N and K tails, an empty expert": lambda g: grouped_case(g, 200, 96, [3, 0, 7, 1]),
    "grouped int64 offsets, one row, small tiles": lambda g: grouped_case(g, 64, 160, [0, 0, 1], torch.int64,
                                                                          "m16_n32_k64_w4_s2"),
    "grouped skewed, several m-tiles per expert": lambda g: grouped_case(g, 96, 64, [40, 1, 0, 0, 2], config="m16_n64_k128_w4_s2"),
    "grouped N = 1, only the last expert": lambda g: grouped_case(g, 1, 32, [0, 0, 0, 5], config="m32_n64_k256_w4_s2"),
    "grouped prefill tile": lambda g: grouped_case(g, 130, 224, [70, 0, 33], config="m64_n128_k64_w4_s2"),
    "masked tails, an empty expert": lambda g: masked_case(g, 130, 96, [5, 0, 2], 5),
    "masked two m-tiles per expert": lambda g: masked_case(g, 64, 64, [20, 17, 0], 20, "m16_n64_k64_w4_s2"),
    "decode is bit-exact (identity x)": exact_decode_case,
    "scale 0xFF decodes to NaN": nan_scale_case,
}


def main(seed: int) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (Triton reads it when the kernel is defined)", file=sys.stderr)
        return 2
    patch_interpreter()
    generator = torch.Generator().manual_seed(seed)
    for name, case in CASES.items():
        try:
            result = case(generator)
        except Exception as error:  # reported per case; the test names it
            result = {"exception": f"{type(error).__name__}: {error}"[:500]}
        print(json.dumps({"case": name, **result}), flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
