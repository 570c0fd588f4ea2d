"""The gpt-oss expert layer four ways, and its float64 reference (all of it runs on the CPU too).

The math is transformers' ``GptOssExperts``: ``h = x @ W_gate_up^T + b1``; gate = even columns,
up = odd columns; ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``;
``a = (up + 1) * gate * sigmoid(alpha * gate)``; ``y = a @ W_down^T + b2``; the k rows of a token
weighted by its routing weights and summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

ALPHA = 1.702
LIMIT = 7.0

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows grouped by expert, offsets [E+1]) -> out


@dataclass
class ExpertWeights:
    """One layer's experts: packed MXFP4 (ours), their exact bf16 dequantization, the biases."""

    gate_up: Any  # PackedMXFP4 [E, 2I, H], checkpoint (interleaved) row order: the unfused glue
    gate_up_paired: Any  # the same weight through mxfp4.pack_gate_up: what mxfp4.moe fuses
    down: Any  # PackedMXFP4 [E, H, I]
    gate_up_bf16: torch.Tensor  # [E, 2I, H]
    down_bf16: torch.Tensor  # [E, H, I]
    gate_up_bias: torch.Tensor  # bf16 [E, 2I]
    down_bias: torch.Tensor  # bf16 [E, H]

    @property
    def num_experts(self) -> int:
        return self.gate_up_bf16.shape[0]


def gpt_oss_activation(h: torch.Tensor, alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """transformers' ``GptOssExperts._apply_gate`` on interleaved gate/up columns."""
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def routing_plan(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, expert of each sorted row, token of each sorted row, offsets int32 [E + 1]), all on the
    device without a host sync (so the composition captures into a CUDA graph)."""
    flat = topk_ids.reshape(-1).long()
    experts, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = counts.cumsum(0)
    return order, experts, order // topk_ids.shape[1], offsets


def composed_layer(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w: ExpertWeights,
                   gate_up_mm: Matmul, down_mm: Matmul) -> torch.Tensor:
    """The unfused layer a user writes today: sort, offsets, gather, two grouped GEMMs, bias adds,
    the clamped SwiGLU, routing weights, ``index_add_``."""
    order, experts, tokens, offsets = routing_plan(topk_ids, w.num_experts)
    h = gate_up_mm(x[tokens], offsets) + w.gate_up_bias[experts]
    y = down_mm(gpt_oss_activation(h), offsets) + w.down_bias[experts]
    y = y * topk_weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def ours_unfused(w: ExpertWeights) -> Callable[..., torch.Tensor]:
    import mxfp4

    return lambda x, ids, weights: composed_layer(
        x, ids, weights, w, lambda a, offs: mxfp4.grouped_mm(a, w.gate_up, offs),
        lambda a, offs: mxfp4.grouped_mm(a, w.down, offs))


def torch_bf16(w: ExpertWeights) -> Callable[..., torch.Tensor]:
    """The bf16 torch layer: ``torch._grouped_mm`` on the bf16 weights (transposed views)."""
    gate_up_t, down_t = w.gate_up_bf16.transpose(1, 2), w.down_bf16.transpose(1, 2)
    return lambda x, ids, weights: composed_layer(
        x, ids, weights, w, lambda a, offs: torch._grouped_mm(a, gate_up_t, offs=offs[1:]),
        lambda a, offs: torch._grouped_mm(a, down_t, offs=offs[1:]))


def ours_fused(w: ExpertWeights) -> Callable[..., torch.Tensor]:
    """``mxfp4.moe``: the whole layer in one call."""
    import mxfp4

    return lambda x, ids, weights: mxfp4.moe(x, ids, weights, w.gate_up_paired, w.down,
                                             gate_up_bias=w.gate_up_bias, down_bias=w.down_bias)


def ours_fused_fp8(w: ExpertWeights) -> Callable[..., torch.Tensor]:
    """``mxfp4.moe(..., activations="fp8")`` on FP8-ready copies of the same weights (made once, here): e4m3
    activations, the quantizer gathering x's rows, W4A8 kernels."""
    import mxfp4

    gate_up = mxfp4.pack_gate_up(mxfp4.unpack(w.gate_up), activations="fp8")
    down = mxfp4.pack(mxfp4.unpack(w.down), activations="fp8")
    return lambda x, ids, weights: mxfp4.moe(x, ids, weights, gate_up, down, gate_up_bias=w.gate_up_bias,
                                             down_bias=w.down_bias, activations="fp8")


def transformers_grouped_mm(w: ExpertWeights) -> Callable[..., torch.Tensor]:
    """transformers' own ``GptOssExperts`` with its ``grouped_mm`` experts implementation, bf16 weights
    (transformers stores them transposed, ``[E, in, out]``: views of ours). ImportError without it."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    e, two_i, h = w.gate_up_bf16.shape
    config = GptOssConfig(hidden_size=h, intermediate_size=two_i // 2, num_local_experts=e, num_experts_per_tok=4)
    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        module = GptOssExperts(config)
    parameter = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
    module.gate_up_proj = parameter(w.gate_up_bf16.transpose(1, 2))
    module.gate_up_proj_bias = parameter(w.gate_up_bias)
    module.down_proj = parameter(w.down_bf16.transpose(1, 2))
    module.down_proj_bias = parameter(w.down_bias)
    module.alpha, module.limit = ALPHA, LIMIT
    return lambda x, ids, weights: module(x, ids, weights)


FP8_LAYER = "ours fused, FP8 activations"
FP8_LAYER_TOLERANCE = 5e-2  # the stated budget of mxfp4.moe(activations="fp8") against float64 with bf16 x (README)

LAYERS: dict[str, Callable[[ExpertWeights], Callable[..., torch.Tensor]]] = {
    "ours fused (mxfp4.moe)": ours_fused,
    FP8_LAYER: ours_fused_fp8,
    "ours unfused (2x grouped_mm + glue)": ours_unfused,
    "bf16 torch layer (2x _grouped_mm + glue)": torch_bf16,
    "transformers grouped_mm (bf16)": transformers_grouped_mm,
}


def reference_tokens(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w: ExpertWeights,
                     tokens: list[int]) -> torch.Tensor:
    """float64 layer output ``[len(tokens), H]`` for the given tokens, on the dequantized weights."""
    out = torch.zeros((len(tokens), x.shape[1]), dtype=torch.float64, device=x.device)
    for i, t in enumerate(tokens):
        xt = x[t].double()
        for j, expert in enumerate(topk_ids[t].tolist()):
            h = w.gate_up_bf16[expert].double() @ xt + w.gate_up_bias[expert].double()
            y = w.down_bf16[expert].double() @ gpt_oss_activation(h) + w.down_bias[expert].double()
            out[i] += float(topk_weights[t, j]) * y
    return out
