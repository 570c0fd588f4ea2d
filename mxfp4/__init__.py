"""hopper-mxfp4: MXFP4 (OCP Microscaling) MoE grouped GEMM for H100, with a portable fallback.

Typical use::

    import mxfp4
    w = mxfp4.pack(mxfp4.quantize(weight_bf16))        # [E, N, K], once at load time
    out = mxfp4.grouped_mm(x, w, offsets)              # x bf16 [T, K], offsets int32 [E + 1]
    print(mxfp4.explain(x, w, offsets))                # which path / config, and why
"""

from .checkpoint import GptOssMoELayer, from_ggml, from_gpt_oss, load_gpt_oss_experts, load_gpt_oss_moe_layer, to_ggml
from .dispatch import explain, select_path
from .layout import PackedMXFP4, pack, unpack
from .ops import grouped_mm, grouped_mm_masked, set_debug_checks
from .format import dequantize, quantize
from .moe import moe
from .tensor import MXFP4Tensor

__all__ = [
    "MXFP4Tensor",
    "PackedMXFP4",
    "dequantize",
    "explain",
    "from_ggml",
    "from_gpt_oss",
    "grouped_mm",
    "grouped_mm_masked",
    "load_gpt_oss_experts",
    "load_gpt_oss_moe_layer",
    "GptOssMoELayer",
    "moe",
    "pack",
    "quantize",
    "select_path",
    "set_debug_checks",
    "to_ggml",
    "unpack",
]
