"""hopper-mxfp4: MXFP4 (OCP Microscaling) MoE grouped GEMM for H100, with a portable fallback.

Typical use::

    import mxfp4
    w = mxfp4.pack(mxfp4.quantize(weight_bf16))        # [E, N, K], once at load time
    out = mxfp4.grouped_mm(x, w, offsets)              # x bf16 [T, K], offsets int32 [E + 1]
    print(mxfp4.explain(x, w, offsets))                # which path / config, and why

Layers point one way: the format (``tensor``, ``format``, ``layout``, ``checkpoint``: torch only) <-
the kernel generator and runtime (the ``codegen`` package, built on the layout contract) <- the user API
(``ops``, ``dispatch``, ``moe``, ``integrations``). The format is imported here; the user API loads on first use of one of its
names (or ``import mxfp4.ops``, which also registers ``torch.ops.mxfp4.*``), so that ``codegen`` can
import the format without importing the package that sits on top of it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .checkpoint import GptOssMoELayer, from_ggml, from_gpt_oss, load_gpt_oss_experts, load_gpt_oss_moe_layer, to_ggml
from .format import dequantize, quantize
from .gate_up import PackedGateUp, PackedGateUpFP8, pack_gate_up, unpack_gate_up
from .layout import PackedMXFP4
from .layout_fp8 import PackedMXFP4FP8
from .packing import pack, unpack
from .tensor import MXFP4Tensor

# The user API: public name -> the module of this package that defines it.
_USER_API = {
    "quantize_activations": "activations",
    "grouped_mm": "ops",
    "grouped_mm_masked": "ops",
    "set_debug_checks": "ops",
    "explain": "ops",
    "select_path": "dispatch",
    "set_fallback_memory_budget": "weight_cache",
    "moe": "moe_layer",
    "explain_moe": "moe_layer",
    "set_moe_graphs": "moe_graphs",
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
