"""transformers' expert parallelism for the ``"hopper_mxfp4"`` experts: which experts a rank holds, and a model
laid out the way ``from_pretrained(..., distributed_config=...)`` lays it out.

Under ``DistributedConfig(ep_size=W, ...)`` transformers shards every experts module by expert (``Shard(0)`` on
its expert-parallel mesh): the module's ``num_experts`` becomes E / W, ``_is_expert_parallel`` True, its weights
are DTensors outside forward (local tensors inside), and its forward receives either the whole batch with other
ranks' choices marked by the sentinel id E / W (the all-reduce implementation) or only the rows sent to it, with
local ids (all-to-all). The ``"hopper_mxfp4"`` forward runs ``mxfp4.moe(..., skip_invalid_ids=True)`` there, so
the sentinel choices add exactly zero; this module gives the conversion and the loader the rank's experts.
"""

from __future__ import annotations

import torch

try:  # torch.distributed is optional in torch builds
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - a torch without distributed support
    DTensor = distribute_tensor = None

# The expert-sharded tensors of a GptOssExperts module, any of which tells the rank's share.
_EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if is_dtensor(t) else t


def _sharded_placeholder(module: torch.nn.Module) -> torch.Tensor | None:
    for name in _EXPERT_TENSORS:
        t = getattr(module, name, None)
        if is_dtensor(t) and t.dim() > 0 and t.shape[0] > 0:
            return t
    return None


def local_expert_range(module: torch.nn.Module) -> tuple[int, int, int]:
    """(start, stop, E): the rank's experts ``start:stop`` of the model's E, read from the module's
    expert-sharded DTensors; a module that is not sharded holds all of its ``num_experts``."""
    sharded = _sharded_placeholder(module)
    if sharded is None:
        return 0, module.num_experts, module.num_experts
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(sharded.shape, sharded.device_mesh, sharded.placements)
    return offset[0], offset[0] + shape[0], sharded.shape[0]


def like_placeholder(value: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, every rank holds it) laid out as ``placeholder``: its shard of a DTensor
    placeholder (no communication: each rank keeps its own slice), or ``value`` itself."""
    if not is_dtensor(placeholder):
        return value
    return distribute_tensor(value, placeholder.device_mesh, placeholder.placements, src_data_rank=None)


def local_as_placeholder(local: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
    """A rank's own shard ``local`` wrapped as the DTensor ``placeholder`` describes (or ``local`` itself)."""
    if not is_dtensor(placeholder):
        return local
    return DTensor.from_local(local, placeholder.device_mesh, placeholder.placements, run_check=False,
                              shape=placeholder.shape, stride=placeholder.stride())


def expert_parallel_size(distributed_config: object) -> int:
    """How many ranks share the experts: ``ep_size``, or before transformers 5.21 (``enable_expert_parallel``)
    the tensor-parallel size."""
    size = getattr(distributed_config, "ep_size", None)
    if size is None:
        size = getattr(distributed_config, "tp_size", 1) if getattr(distributed_config, "enable_expert_parallel", False) else 1
    return size or 1


def distribute_meta_model(model: torch.nn.Module, distributed_config: object, caller: str) -> torch.nn.Module:
    """``model`` (on the meta device) with transformers' tensor and expert parallel plans applied, as
    ``from_pretrained(distributed_config=...)`` applies them before it loads weights; initializes
    torch.distributed from the torchrun environment when it is not yet (transformers' own rule)."""
    prepare = getattr(type(model), "prepare_distribute_model", None)
    distribute = getattr(type(model), "maybe_distribute_model", None)
    if prepare is None or distribute is None:
        import transformers

        raise ValueError(f"{caller}: distributed_config needs transformers' distributed engine "
                         f"(DistributedConfig and maybe_distribute_model), this is transformers {transformers.__version__}")
    distributed_config, _, mesh_manager = prepare(distributed_config)  # a dict becomes a DistributedConfig
    if expert_parallel_size(distributed_config) <= 1:
        raise ValueError(f"{caller}: distributed_config must shard the experts (ep_size > 1), got {distributed_config!r}")
    return distribute(model, distributed_config, mesh_manager)
