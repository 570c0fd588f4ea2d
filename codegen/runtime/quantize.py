"""The activation quantizer kernel of ``mxfp4.quantize_activations`` on SM90: bf16 rows -> e4m3 + a float32 scale.

``quantize_fp8_sm90(x, out, scale[, source_rows])`` launches one NVRTC-compiled kernel (templates/mxfp4_quantize_fp8.cuh:
a warp per row; with ``source_rows``, a gather of x's rows too) on torch's current stream: no host sync, no
allocation, so it captures into CUDA graphs.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from codegen.build.params import ParamBlock, ParamField

from .device_functions import DeviceFunctions
from .fast_driver import params_buffer

QUANTIZE_TEMPLATE = "quantize_fp8.cu.j2"
QUANTIZE_ENTRY = "mxfp4_quantize_fp8"
QUANTIZE_THREADS = 128  # four warps, one row each
ROWS_PER_BLOCK = QUANTIZE_THREADS // 32

QUANTIZE_PARAMS = ParamBlock((
    ParamField("x", "uint16_t const*", "Q", 8, "bf16 [rows, k]"),
    ParamField("out", "uint8_t*", "Q", 8, "out: e4m3 [rows, k]"),
    ParamField("scale", "float*", "Q", 8, "out: float32 scale per row"),
    ParamField("source_rows", "int32_t const*", "Q", 8, "row r of out quantizes row source_rows[r] of x (null: row r)"),
    ParamField("rows", "int32_t", "i", 4, "rows of out"),
    ParamField("k", "int32_t", "i", 4, "values per row"),
    ParamField("vectorized", "int32_t", "i", 4, "1: k % 8 == 0 and x, out 16-byte aligned (16-byte loads)"),
))
_QUANTIZE_STRUCT = QUANTIZE_PARAMS.struct


def render_quantize() -> str:
    """CUDA C++ source of the quantizer kernel."""
    from codegen.build.render import render_param_kernel

    return render_param_kernel(QUANTIZE_TEMPLATE, QUANTIZE_PARAMS, QUANTIZE_THREADS, QUANTIZE_ENTRY)


@lru_cache(maxsize=1)
def compiled_quantize():
    """The quantizer's cubin (NVRTC, disk-cached like every kernel)."""
    from codegen.build.compiler import compile_source

    return compile_source(render_quantize(), "quantize_fp8", entry=QUANTIZE_ENTRY)


_FUNCTIONS = DeviceFunctions("quantize_fp8", lambda: compiled_quantize().cubin)


def quantize_fp8_sm90(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor,
                      source_rows: torch.Tensor | None = None) -> None:
    """Quantize the rows of x (bf16, contiguous, last dim K) into ``out`` (float8_e4m3fn) and ``scale`` (float32,
    one per row of out). Without ``source_rows`` out has x's shape; with it (int32, contiguous, on x's device) row r
    of out is row ``source_rows[r]`` of x quantized: the gather of the MoE layer's rows and their quantization in
    one launch (each row's scale depends on that row alone, so this equals quantizing x, then gathering). Inputs
    are validated by the callers (mxfp4.ops.activations, mxfp4.experts.fused_steps)."""
    k = x.shape[-1]
    rows = x.numel() // k if source_rows is None else source_rows.numel()
    if rows == 0:
        return
    vectorized = k % 8 == 0 and x.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
    source = 0 if source_rows is None else source_rows.data_ptr()
    _QUANTIZE_STRUCT.pack_into(params_buffer(QUANTIZE_PARAMS.size), 0, x.data_ptr(), out.data_ptr(), scale.data_ptr(),
                               source, rows, k, int(vectorized))
    from .launch import launch_on

    blocks = -(-rows // ROWS_PER_BLOCK)
    launch_on(x.device.index, _FUNCTIONS.get(x.device, QUANTIZE_ENTRY), blocks, QUANTIZE_THREADS, 0, "quantize_fp8")
