"""transformers drop-in: the ``"hopper_mxfp4"`` experts implementation for gpt-oss.

``GptOssExperts.forward`` dispatches through transformers' ``ExpertsInterface`` on
``config._experts_implementation``; importing this module registers ``"hopper_mxfp4"`` there, and
:func:`convert_gpt_oss` packs every layer's experts and switches the model to it::

    from mxfp4.integrations.transformers import convert_gpt_oss
    model = AutoModelForCausalLM.from_pretrained("openai/gpt-oss-20b", dtype=torch.bfloat16, device_map="cuda")
    convert_gpt_oss(model, checkpoint="/path/to/gpt-oss-20b")   # the checkpoint's MXFP4 bytes, bit-exact

The packed weights are non-persistent buffers of each experts module (they follow ``model.to``, and
``save_pretrained`` does not write them); the module's biases and its dense weights stay as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

try:
    from transformers.integrations.moe import ExpertsInterface
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "mxfp4.integrations.transformers needs transformers with gpt-oss experts interface support: "
        "pip install 'transformers>=5'"
    ) from error

from ..checkpoint import load_gpt_oss_moe_layer
from ..format import quantize
from ..gate_up import pack_for_moe
from ..layout import PackedMXFP4, pack
from ..moe_layer import moe

IMPLEMENTATION = "hopper_mxfp4"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts$")


def _packed(module: torch.nn.Module, name: str) -> PackedMXFP4:
    data = getattr(module, f"{name}_mxfp4", None)
    if data is None:
        raise RuntimeError(
            f"{type(module).__name__} has no packed MXFP4 weights; call "
            "mxfp4.integrations.transformers.convert_gpt_oss(model) before selecting 'hopper_mxfp4'"
        )
    kind, n, k = module._mxfp4_shapes[name]  # kind: PackedGateUp when the gate/up rows are paired
    return kind(data, n, k)


def hopper_mxfp4_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward of a converted ``GptOssExperts``: one ``mxfp4.moe`` call (bf16 inside)."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("hopper_mxfp4: expert parallelism is not supported")
    out = moe(
        hidden_states.to(torch.bfloat16).contiguous(), top_k_index,
        top_k_weights if top_k_weights.dtype in (torch.float32, torch.bfloat16) else top_k_weights.float(),
        _packed(self, "gate_up_proj"), _packed(self, "down_proj"),
        gate_up_bias=self.gate_up_proj_bias, down_bias=self.down_proj_bias,
        alpha=float(self.alpha), limit=float(self.limit),
    )
    return out.to(hidden_states.dtype)


ExpertsInterface.register(IMPLEMENTATION, hopper_mxfp4_experts_forward)


def _quantized_from_module(module: GptOssExperts) -> tuple[PackedMXFP4, PackedMXFP4]:
    # The module holds [E, K, N] (x @ W); mxfp4 packs [E, N, K] with the scale blocks along K.
    with torch.no_grad():
        gate_up = pack_for_moe(quantize(module.gate_up_proj.detach().transpose(1, 2)))
        down = pack(quantize(module.down_proj.detach().transpose(1, 2)))
    return gate_up, down


def _from_checkpoint(module: GptOssExperts, checkpoint: str | Path, name: str) -> tuple[PackedMXFP4, PackedMXFP4]:
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"convert_gpt_oss: cannot tell the layer index of module {name!r} (expected '...layers.N.mlp.experts')")
    layer = load_gpt_oss_moe_layer(checkpoint, int(match.group(1)), device=module.gate_up_proj.device)
    expected = (module.num_experts, 2 * module.intermediate_size, module.hidden_size)
    if tuple(layer.gate_up.shape) != expected:
        raise ValueError(
            f"convert_gpt_oss: checkpoint layer {match.group(1)} has gate_up_proj {list(layer.gate_up.shape)}, "
            f"but module {name} expects {list(expected)}"
        )
    return layer.gate_up, layer.down


def _install(module: GptOssExperts, gate_up: PackedMXFP4, down: PackedMXFP4) -> None:
    device = module.gate_up_proj.device
    module.register_buffer("gate_up_proj_mxfp4", gate_up.data.to(device), persistent=False)
    module.register_buffer("down_proj_mxfp4", down.data.to(device), persistent=False)
    module._mxfp4_shapes = {"gate_up_proj": (type(gate_up), gate_up.n, gate_up.k), "down_proj": (type(down), down.n, down.k)}


def convert_gpt_oss(model: torch.nn.Module, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """Pack every ``GptOssExperts`` of ``model`` to MXFP4 and switch it to ``"hopper_mxfp4"``.

    ``checkpoint``: a gpt-oss ``.safetensors`` file or directory; its ``*_blocks`` / ``*_scales`` are
    packed bit-exactly. None: the module's own weights are quantized (``mxfp4.quantize``, after
    transposing transformers' ``[E, K, N]`` to ``[E, N, K]``). Returns ``model`` (converted in place).
    """
    experts = [(name, module) for name, module in model.named_modules() if isinstance(module, GptOssExperts)]
    if not experts:
        raise ValueError(
            f"convert_gpt_oss: {type(model).__name__} has no GptOssExperts module (already quantized by "
            "transformers' Mxfp4Config? load it with Mxfp4Config(dequantize=True) or in bf16 instead)"
        )
    for name, module in experts:
        packed = _from_checkpoint(module, checkpoint, name) if checkpoint is not None else _quantized_from_module(module)
        _install(module, *packed)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(IMPLEMENTATION)
    for _, module in experts:  # modules built outside a PreTrainedModel read their own config
        if module.config._experts_implementation != IMPLEMENTATION:
            module.config._experts_implementation = IMPLEMENTATION
    return model
