"""hopper-mxfp4: MXFP4 (OCP Microscaling) MoE grouped GEMM for H100, with a portable fallback.

Typical use::

    import mxfp4
    w = mxfp4.pack(mxfp4.quantize(weight_bf16))        # [E, N, K], once at load time
    out = mxfp4.grouped_mm(x, w, offsets)              # x bf16 [T, K], offsets int32 [E + 1]
    print(mxfp4.explain(x, w, offsets))                # which path / config, and why

Packages by concern, layers pointing one way: ``mxfp4.format`` (the tensor, quantize/dequantize, the packed
layouts, checkpoints: torch only) <- the kernel generator and runtime (the ``codegen`` package, built on the layout
contract) <- the user API (``mxfp4.ops``: the grouped GEMM ops, path selection and explain; ``mxfp4.portable``: the
path off Hopper; ``mxfp4.experts``: the MoE layer) <- ``mxfp4.integrations``. The format is imported here; the
user API loads on first use of one of its names (or ``import mxfp4.ops``, which registers ``torch.ops.mxfp4.*``),
so that ``codegen`` can import the format without importing the packages that sit on top of it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .format.checkpoint import (
    GptOssMoELayer,
    from_ggml,
    from_gpt_oss,
    load_gpt_oss_experts,
    load_gpt_oss_moe_layer,
    to_ggml,
)
from .format.codec import dequantize, quantize
from .format.gate_up import PackedGateUp, PackedGateUpFP8, pack_gate_up, unpack_gate_up
from .format.layout import PackedMXFP4
from .format.layout_fp8 import PackedMXFP4FP8
from .format.packing import pack, unpack
from .format.tensor import MXFP4Tensor

# The user API: public name -> the module of this package that defines it.
_USER_API = {
    "quantize_activations": "ops.activations",
    "grouped_mm": "ops.grouped_gemm",
    "grouped_mm_masked": "ops.grouped_gemm",
    "set_debug_checks": "ops.grouped_gemm",
    "explain": "ops.grouped_gemm",
    "select_path": "ops.dispatch",
    "force_portable": "ops.dispatch",
    "set_fallback_memory_budget": "portable.weight_cache",
    "moe": "experts.layer",
    "explain_moe": "experts.layer",
    "set_moe_graphs": "experts.graphs",
}

__all__ = [
    "MXFP4Tensor",
    "PackedGateUp",
    "PackedGateUpFP8",
    "PackedMXFP4",
    "PackedMXFP4FP8",
    "dequantize",
    "from_ggml",
    "from_gpt_oss",
    "load_gpt_oss_experts",
    "load_gpt_oss_moe_layer",
    "GptOssMoELayer",
    "pack",
    "pack_gate_up",
    "quantize",
    "to_ggml",
    "unpack",
    "unpack_gate_up",
    *_USER_API,
]


def __getattr__(name: str) -> Any:
    module = _USER_API.get(name)
    if module is None:
        raise AttributeError(f"module 'mxfp4' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_USER_API))
