"""The fused MoE layer's gather and top-k sum kernels: parameter blocks, source, cubin, loaded functions.

``mxfp4_moe_gather`` copies x's rows into routed order (what ``x.index_select(0, row_token)`` did) and
zeroes the stream-K tile counters of the GEMMs that follow; ``mxfp4_moe_topk_sum`` sums each token's k
slots in slot order (what ``slots.sum(dim=1)`` did, in one documented order). Both read and write raw
addresses, so the layer's host side makes no torch op for them (templates/mxfp4_moe_glue.cuh has the
device side; codegen.runtime.moe_plan launches them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from codegen.build.params import PARAMS_ALIGN, ParamBlock, ParamField

from .device_functions import DeviceFunctions

GLUE_TEMPLATE = "moe_glue.cu.j2"
GATHER_ENTRY = "mxfp4_moe_gather"
TOPK_SUM_ENTRY = "mxfp4_moe_topk_sum"
GATHER_THREADS = 128  # one CTA per routed row; gpt-oss rows are 360 16-byte vectors
TOPK_SUM_THREADS = 256  # one thread per 8 output columns

GATHER_PARAMS = ParamBlock((
    ParamField("x", "void const*", "Q", 8, "bf16 [T, H]: the layer's input"),
    ParamField("rows", "void*", "Q", 8, "out: bf16 [T·k, H], x's rows in routed order"),
    ParamField("row_token", "int32_t const*", "Q", 8, "token of each routed row (the routing kernel's)"),
    ParamField("offsets", "int32_t const*", "Q", 8, "[E + 1] (the routing kernel's): offsets[E] rows are placed"),
    ParamField("zero", "int32_t*", "Q", 8, "out: words set to zero (the GEMMs' stream-K tile counters), or null"),
    ParamField("zero_words", "int32_t", "i", 4, "how many"),
    ParamField("num_experts", "int32_t", "i", 4, "E"),
    ParamField("row_bytes", "int32_t", "i", 4, "bytes of one row of x: 2 H"),
    ParamField("vector16", "int32_t", "i", 4, "1: x, rows and row_bytes are 16-byte aligned (16-byte copies)"),
))
TOPK_SUM_PARAMS = ParamBlock((
    ParamField("slots", "uint16_t const*", "Q", 8, "bf16 [T, k, H]: each choice's weighted down projection"),
    ParamField("out", "uint16_t*", "Q", 8, "out: bf16 [T, H], 16-byte aligned"),
    ParamField("tokens", "int32_t", "i", 4, "T"),
    ParamField("top_k", "int32_t", "i", 4, "k"),
    ParamField("cols", "int32_t", "i", 4, "H, a multiple of 8"),
))


@dataclass(frozen=True)
class GlueKernel:
    entry: str
    function: str  # the mxfp4:: device function it runs
    struct: str
    params: ParamBlock
    threads: int


GATHER = GlueKernel(GATHER_ENTRY, "gather_rows", "GatherParams", GATHER_PARAMS, GATHER_THREADS)
TOPK_SUM = GlueKernel(TOPK_SUM_ENTRY, "topk_sum", "TopkSumParams", TOPK_SUM_PARAMS, TOPK_SUM_THREADS)
GLUE_KERNELS = (GATHER, TOPK_SUM)


def gather_grid(routed: int) -> int:
    """One CTA per routed row (T·k)."""
    return max(1, routed)


def topk_sum_grid(tokens: int, cols: int) -> int:
    """One thread per 8 columns of the [T, H] output."""
    return max(1, -(-tokens * (cols // 8) // TOPK_SUM_THREADS))


def render_glue() -> str:
    """CUDA C++ source of both kernels (one module)."""
    from codegen.build.render import environment

    kernels = [
        {"entry": k.entry, "function": k.function, "struct": k.struct, "threads": k.threads,
         "params": k.params.template_fields(), "params_size": k.params.size}
        for k in GLUE_KERNELS
    ]
    return environment().get_template(GLUE_TEMPLATE).render(kernels=kernels, params_align=PARAMS_ALIGN)


@lru_cache(maxsize=1)
def compiled_glue():
    """The module's cubin (NVRTC, disk-cached like every kernel)."""
    from codegen.build.compiler import compile_source

    return compile_source(render_glue(), "moe_glue", entry=GATHER_ENTRY)


_FUNCTIONS = DeviceFunctions("moe_glue", lambda: compiled_glue().cubin)


def glue_function(device: torch.device, entry: str) -> int:
    """The CUfunction handle of ``entry`` on ``device`` (compiled and loaded on first use)."""
    return _FUNCTIONS.get(device, entry)
