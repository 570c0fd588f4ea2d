"""The ``"hopper_mxfp4"`` experts implementation of transformers' ``GptOssExperts``: where a module keeps its
packed weights, and its forward (one ``mxfp4.moe`` call).

Importing this module registers ``"hopper_mxfp4"`` in transformers' ``ExpertsInterface``.
:func:`install_packed` gives a module its packed weights, as non-persistent buffers (they follow
``model.to``; ``save_pretrained`` does not write them), and frees its dense ``gate_up_proj`` /
``down_proj``: they become empty parameters (zero elements, same dtype and device), so the model holds
no dense copy of the expert weights, and ``.to()``, ``state_dict()`` and the forward keep working.
"""

from __future__ import annotations

import torch

try:
    from transformers.integrations.moe import ExpertsInterface
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "mxfp4.integrations.transformers needs transformers with gpt-oss experts interface support: "
        "pip install 'transformers>=5'"
    ) from error

from mxfp4.experts.layer import moe
from mxfp4.format.layout import PackedMXFP4

from .expert_parallel import local_tensor

IMPLEMENTATION = "hopper_mxfp4"
DENSE_WEIGHTS = ("gate_up_proj", "down_proj")


def packed_weight(module: torch.nn.Module, name: str) -> PackedMXFP4:
    """The packed ``gate_up_proj`` or ``down_proj`` of a module :func:`install_packed` has converted."""
    data = getattr(module, f"{name}_mxfp4", None)
    if data is None:
        raise RuntimeError(
            f"{type(module).__name__} has no packed MXFP4 weights; call "
            "mxfp4.integrations.transformers.convert_gpt_oss(model) (or load it with load_gpt_oss) before "
            "selecting 'hopper_mxfp4'"
        )
    kind, n, k = module._mxfp4_shapes[name]  # kind: PackedGateUp when the gate/up rows are paired
    return kind(data, n, k)


def _local(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else local_tensor(bias)  # transformers swaps in the local shards; be sure


def is_expert_parallel(module: torch.nn.Module) -> bool:
    """Whether transformers sharded ``module`` by expert (its forward then gets other ranks' choices as sentinels)."""
    flag = getattr(module, "_is_expert_parallel", None)
    if flag is not None:
        return bool(flag)
    # transformers before 5.21 sets no flag; its expert-parallel plan lowers num_experts below the model's
    config = getattr(module, "config", None)
    return config is not None and module.num_experts < getattr(config, "num_local_experts", module.num_experts)


def hopper_mxfp4_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward of a converted ``GptOssExperts``: one ``mxfp4.moe`` call (bf16 inside).

    Under transformers' expert parallelism the module holds this rank's experts and other ranks' choices
    arrive as the sentinel id ``num_experts`` (weight 0): they add exactly zero (``skip_invalid_ids``)."""
    out = moe(
        hidden_states.to(torch.bfloat16).contiguous(), top_k_index,
        top_k_weights if top_k_weights.dtype in (torch.float32, torch.bfloat16) else top_k_weights.float(),
        packed_weight(self, "gate_up_proj"), packed_weight(self, "down_proj"),
        gate_up_bias=_local(self.gate_up_proj_bias), down_bias=_local(self.down_proj_bias),
        alpha=float(self.alpha), limit=float(self.limit),
        skip_invalid_ids=is_expert_parallel(self),
    )
    return out.to(hidden_states.dtype)


ExpertsInterface.register(IMPLEMENTATION, hopper_mxfp4_experts_forward)


def release_dense(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace the module's dense expert weights by empty parameters (zero elements) of ``dtype`` on ``device``."""
    for name in DENSE_WEIGHTS:
        setattr(module, name, torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False))


def install_packed(
    module: torch.nn.Module, gate_up: PackedMXFP4, down: PackedMXFP4, dtype: torch.dtype | None = None
) -> None:
    """Give ``module`` its packed weights (on their own device) and free its dense ones (their empty
    stand-ins take ``dtype``, default the dense weights' own)."""
    module.register_buffer("gate_up_proj_mxfp4", gate_up.data, persistent=False)
    module.register_buffer("down_proj_mxfp4", down.data, persistent=False)
    module._mxfp4_shapes = {"gate_up_proj": (type(gate_up), gate_up.n, gate_up.k), "down_proj": (type(down), down.n, down.k)}
    release_dense(module, dtype or module.gate_up_proj.dtype, gate_up.data.device)


def is_converted(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds packed weights (from :func:`install_packed`)."""
    return getattr(module, "gate_up_proj_mxfp4", None) is not None


def use_hopper_mxfp4(model: torch.nn.Module, modules: list[torch.nn.Module]) -> None:
    """Switch ``model`` (and ``modules``, its experts, which may carry configs of their own) to "hopper_mxfp4"."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(IMPLEMENTATION)
    for module in modules:  # modules built outside a PreTrainedModel read their own config
        if module.config._experts_implementation != IMPLEMENTATION:
            module.config._experts_implementation = IMPLEMENTATION
