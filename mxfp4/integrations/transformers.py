"""transformers drop-in: the ``"hopper_mxfp4"`` experts implementation for gpt-oss.

``GptOssExperts.forward`` dispatches through transformers' ``ExpertsInterface`` on
``config._experts_implementation``; importing this module registers ``"hopper_mxfp4"`` there
(``gpt_oss_experts``). Two ways to a model that runs it::

    from mxfp4.integrations.transformers import convert_gpt_oss, load_gpt_oss
    model = load_gpt_oss("/path/to/gpt-oss-20b", device="cuda")   # MXFP4 checkpoint -> packed, no dense experts
    # or convert a loaded model in place:
    model = AutoModelForCausalLM.from_pretrained("openai/gpt-oss-20b", dtype=torch.bfloat16, device_map="cuda",
                                                 quantization_config=Mxfp4Config(dequantize=True))
    convert_gpt_oss(model, checkpoint="/path/to/gpt-oss-20b")   # the checkpoint's MXFP4 bytes, bit-exact

Either way each experts module holds its packed weights as non-persistent buffers (they follow
``model.to``, and ``save_pretrained`` does not write them), its biases as they are, and no dense
expert weight: ``gate_up_proj`` / ``down_proj`` are empty parameters.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

try:
    from transformers.integrations.moe import ExpertsInterface  # noqa: F401 - the check that transformers fits
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "mxfp4.integrations.transformers needs transformers with gpt-oss experts interface support: "
        "pip install 'transformers>=5'"
    ) from error

from mxfp4.format.checkpoint import read_moe_layer
from mxfp4.format.codec import quantize
from mxfp4.format.gate_up import pack_for_moe
from mxfp4.format.layout import PackedMXFP4, pack
from mxfp4.format.shards import ShardedCheckpoint

from .expert_parallel import local_expert_range, local_tensor
from .gpt_oss_experts import (
    IMPLEMENTATION,
    hopper_mxfp4_experts_forward,
    install_packed,
    is_converted,
    packed_weight,
    use_hopper_mxfp4,
)
from .gpt_oss_loader import load_gpt_oss

__all__ = ["IMPLEMENTATION", "convert_gpt_oss", "hopper_mxfp4_experts_forward", "load_gpt_oss"]
_packed = packed_weight  # the name the tests and earlier callers use
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts$")


def _quantized_from_module(module: GptOssExperts) -> tuple[PackedMXFP4, PackedMXFP4]:
    # The module holds [E, K, N] (x @ W); mxfp4 packs [E, N, K] with the scale blocks along K. Under expert
    # parallelism the weights are DTensors: this rank packs its own experts (the local shard).
    with torch.no_grad():
        gate_up = pack_for_moe(quantize(local_tensor(module.gate_up_proj.detach()).transpose(1, 2)))
        down = pack(quantize(local_tensor(module.down_proj.detach()).transpose(1, 2)))
    return gate_up, down


def _from_checkpoint(module: GptOssExperts, checkpoint: ShardedCheckpoint, name: str) -> tuple[PackedMXFP4, PackedMXFP4]:
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"convert_gpt_oss: cannot tell the layer index of module {name!r} (expected '...layers.N.mlp.experts')")
    start, stop, num_experts = local_expert_range(module)  # this rank's experts under expert parallelism
    dims = (num_experts, module.hidden_size, module.intermediate_size)
    layer = read_moe_layer(checkpoint, int(match.group(1)), module.gate_up_proj_bias.device, (start, stop), dims)
    return layer.gate_up, layer.down


def convert_gpt_oss(model: torch.nn.Module, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """Pack every ``GptOssExperts`` of ``model`` to MXFP4, free its dense weights, switch it to ``"hopper_mxfp4"``.

    ``checkpoint``: a gpt-oss ``.safetensors`` file or directory; its ``*_blocks`` / ``*_scales`` are
    packed bit-exactly (errors name the file and the tensor). None: the module's own weights are
    quantized (``mxfp4.quantize``, after transposing transformers' ``[E, K, N]`` to ``[E, N, K]``);
    modules converted before are left as they are. A layer at a time: each layer's dense weights are
    freed once its packed ones are in place, so memory peaks at the model's plus one layer's packed
    weights. Returns ``model`` (converted in place).

    A model sharded by transformers' expert parallelism (``from_pretrained(..., distributed_config=
    DistributedConfig(..., ep_size=W))``, under torchrun) is converted on every rank: each rank packs its own
    experts (from its shard, or the checkpoint's rows of them) and runs them with the sentinel choices of
    other ranks' experts adding zero.
    """
    experts = [(name, module) for name, module in model.named_modules() if isinstance(module, GptOssExperts)]
    if not experts:
        raise ValueError(
            f"convert_gpt_oss: {type(model).__name__} has no GptOssExperts module (already quantized by "
            "transformers' Mxfp4Config? load it with Mxfp4Config(dequantize=True) or in bf16 instead)"
        )
    files = ShardedCheckpoint(checkpoint, "convert_gpt_oss") if checkpoint is not None else None
    for name, module in experts:
        if files is None and is_converted(module):
            continue  # its dense weights are gone: nothing to quantize
        packed = _from_checkpoint(module, files, name) if files is not None else _quantized_from_module(module)
        install_packed(module, *packed)
    use_hopper_mxfp4(model, [module for _, module in experts])
    return model
