"""Kernel parameter blocks: one field list per kernel that renders the C++ struct and packs its bytes.

Each kernel takes a single ``__grid_constant__`` struct; its template renders it from the fields
(``ParamBlock.template_fields``, with the size checked by a static_assert), and the launcher packs
the same bytes with ``ParamBlock.struct``, so the two sides cannot drift apart. ``PARAM_FIELDS`` is
the grouped GEMM's block; codegen.runtime.routing declares the MoE routing kernel's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

TENSOR_MAP_BYTES = 128  # CUtensorMap
PARAMS_ALIGN = 64  # CUtensorMap's alignment


@dataclass(frozen=True)
class ParamField:
    name: str
    ctype: str  # C++ type in the struct
    fmt: str  # struct module format of the value ("" for the raw tensor map bytes)
    size: int
    comment: str


PARAM_FIELDS: tuple[ParamField, ...] = (
    ParamField("x_map", "mxfp4::TensorMap", "", TENSOR_MAP_BYTES, "TMA map of x as [rows, K] bf16 (fp8: uint8), 128B swizzle"),
    ParamField("w", "uint8_t const*", "Q", 8, "packed weights [E, N/64, K/64, 2176]"),
    ParamField("out", "uint16_t*", "Q", 8, "bf16 output [rows, N] (SwiGLU with out_row_scale: e4m3 [rows, N / 2])"),
    ParamField("rows", "void const*", "Q", 8, "offsets [E+1] (contiguous) or masked_m [E] (masked)"),
    ParamField("num_experts", "int32_t", "i", 4, "E"),
    ParamField("n", "int32_t", "i", 4, "logical N"),
    ParamField("n_atoms", "int32_t", "i", 4, "N padded to 64, in atoms"),
    ParamField("k_atoms", "int32_t", "i", 4, "K padded to 64, in atoms"),
    ParamField("max_m", "int32_t", "i", 4, "masked: rows per expert slot"),
    ParamField("total_rows", "int32_t", "i", 4, "rows of x (and out)"),
    ParamField("masked", "int32_t", "i", 4, "1: rows = masked_m, 0: rows = offsets"),
    ParamField("rows_int64", "int32_t", "i", 4, "1 when rows is int64"),
    # Epilogue inputs (mxfp4_epilogue.cuh); null / unused for the plain store.
    ParamField("bias", "uint16_t const*", "Q", 8, "bf16 bias [E, bias_stride] or null"),
    ParamField("row_scale", "float const*", "Q", 8, "ScaleScatter: fp32 factor per row of x"),
    ParamField("row_dest", "int32_t const*", "Q", 8, "ScaleScatter: output row of each row of x"),
    ParamField("out_cols", "int32_t", "i", 4, "columns of out: N, or N / 2 for SwiGLU"),
    ParamField("bias_stride", "int32_t", "i", 4, "elements per expert in bias"),
    ParamField("alpha", "float", "f", 4, "SwiGLU: sigmoid(alpha * gate)"),
    ParamField("limit", "float", "f", 4, "SwiGLU: clamp limit"),
    # SwiGLU's e4m3 output (mxfp4.moe's FP8 layer): out = e4m3(value * out_scale_inverse), out_scale per row.
    ParamField("out_row_scale", "float*", "Q", 8, "SwiGLU: fp32 scale per row of out, written; null: bf16 out"),
    ParamField("out_scale", "float", "f", 4, "SwiGLU e4m3 out: the rows' scale, a power of two"),
    ParamField("out_scale_inverse", "float", "f", 4, "SwiGLU e4m3 out: 1 / out_scale"),
    # Row scales of FP8 activations (and of the FP8-ready weights): acc * x_scale[row] * w_scale[e, n].
    ParamField("x_scale", "float const*", "Q", 8, "fp32 scale per row of x, or null"),
    ParamField("w_scale", "float const*", "Q", 8, "W4A8: fp32 row scale of the weights [E, w_scale_stride]"),
    ParamField("w_scale_stride", "int32_t", "i", 4, "W4A8: rows per expert in w_scale (N padded to 64)"),
    # Stream-K (mxfp4_stream_k.cuh); null for the tile-by-tile configs.
    ParamField("workspace", "float*", "Q", 8, "stream-K: fp32 accumulators of cut tiles"),
    ParamField("tile_counters", "int32_t*", "Q", 8, "stream-K: k-steps done per tile and warpgroup, zeroed per launch"),
)


@dataclass(frozen=True)
class ParamBlock:
    """A kernel's parameter struct: C++ field offsets (natural alignment, the tensor map at 64), the
    size rounded to 64, and one precompiled ``struct`` that packs every field in order."""

    fields: tuple[ParamField, ...]

    @property
    def offsets(self) -> dict[str, int]:
        return _layout(self.fields)[0]

    @property
    def size(self) -> int:
        return _layout(self.fields)[1]

    @property
    def struct(self) -> struct.Struct:
        return _struct(self.fields)

    def template_fields(self) -> list[dict[str, object]]:
        """The field list as the templates render it."""
        offsets = self.offsets
        return [{"name": f.name, "ctype": f.ctype, "offset": offsets[f.name], "comment": f.comment} for f in self.fields]


@lru_cache(maxsize=None)
def _layout(fields: tuple[ParamField, ...]) -> tuple[dict[str, int], int]:
    offsets: dict[str, int] = {}
    cursor = 0
    for field in fields:
        align = min(field.size, 8) if field.fmt else PARAMS_ALIGN
        cursor = (cursor + align - 1) // align * align
        offsets[field.name] = cursor
        cursor += field.size
    return offsets, (cursor + PARAMS_ALIGN - 1) // PARAMS_ALIGN * PARAMS_ALIGN


@lru_cache(maxsize=None)
def _struct(fields: tuple[ParamField, ...]) -> struct.Struct:
    """One ``struct`` for the whole block (explicit pad bytes at the C++ offsets)."""
    offsets, size = _layout(fields)
    parts, cursor = ["<"], 0
    for field in fields:
        offset = offsets[field.name]
        parts.append(f"{offset - cursor}x" if offset > cursor else "")
        parts.append(field.fmt or f"{field.size}s")
        cursor = offset + field.size
    parts.append(f"{size - cursor}x")
    packer = struct.Struct("".join(parts))
    assert packer.size == size
    return packer


GROUPED_MM_PARAMS = ParamBlock(PARAM_FIELDS)
# The grouped GEMM's block, as the launcher and the template use it; the hot path packs it with
# one precompiled call, fields in PARAM_FIELDS order.
PARAM_OFFSETS, PARAMS_SIZE, PARAMS_STRUCT = GROUPED_MM_PARAMS.offsets, GROUPED_MM_PARAMS.size, GROUPED_MM_PARAMS.struct


def template_fields() -> list[dict[str, object]]:
    """The grouped GEMM's field list as its template renders it."""
    return GROUPED_MM_PARAMS.template_fields()


def pack_params(**values: float | bytes) -> bytearray:
    """The parameter block's bytes, every field given by name (the tensor maps as their 128 bytes)."""
    expected = {f.name for f in PARAM_FIELDS}
    if set(values) != expected:
        raise ValueError(f"pack_params needs exactly {sorted(expected)}, got {sorted(values)}")
    for field in PARAM_FIELDS:
        if not field.fmt and len(values[field.name]) != TENSOR_MAP_BYTES:  # type: ignore[arg-type]
            raise ValueError(f"{field.name} must be {TENSOR_MAP_BYTES} bytes, got {len(values[field.name])}")  # type: ignore[arg-type]
    block = bytearray(PARAMS_SIZE)
    PARAMS_STRUCT.pack_into(block, 0, *(values[f.name] for f in PARAM_FIELDS))
    return block
