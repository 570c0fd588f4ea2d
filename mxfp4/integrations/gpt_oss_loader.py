"""``load_gpt_oss``: a gpt-oss MXFP4 checkpoint straight into a transformers ``GptOssForCausalLM`` that runs
the ``"hopper_mxfp4"`` experts, with no dense expert weight ever allocated.

The model is built on the meta device (no memory), every tensor the checkpoint must hold is checked
against it from the shards' headers before anything is read (name, dtype, shape; errors name the file
and the tensor), and then, a layer at a time: each non-expert tensor is read from its shard, cast to
``dtype`` on the host and copied to ``device``; each expert weight's ``*_blocks`` / ``*_scales`` are
packed on ``device`` a few experts at a time (``mxfp4.format.checkpoint.read_moe_layer``: gate_up rows paired
for the fused kernels); the biases stay as stored. So the device never holds more than the finished
model plus one chunk's packing temporaries, and the host about one tensor.

With ``distributed_config`` (transformers' ``DistributedConfig`` with ``ep_size > 1``, under torchrun) the
meta model is first laid out as ``from_pretrained(distributed_config=...)`` lays it out (transformers' own
tensor and expert parallel plans), and then each rank reads only its own experts and keeps its shard of
every tensor a plan splits.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from transformers import GenerationConfig, GptOssConfig, GptOssForCausalLM

from mxfp4.format.checkpoint import (
    GPT_OSS_EXPERT_WEIGHTS,
    check_moe_layer,
    expert_range,
    expert_tensor_name,
    read_moe_layer,
)
from mxfp4.format.shards import FLOATING, CheckpointError, ShardedCheckpoint

from .expert_parallel import (
    distribute_meta_model,
    like_placeholder,
    local_as_placeholder,
    local_expert_range,
)
from .gpt_oss_experts import DENSE_WEIGHTS, install_packed, use_hopper_mxfp4

CALLER = "load_gpt_oss"
CONFIG_FILE = "config.json"
_EXPERT_PARTS = ("blocks", "scales", "bias")


def _check_options(device: object, dtype: object) -> torch.device:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{CALLER}: dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as error:
        raise TypeError(f"{CALLER}: device must be a torch.device or a device string such as 'cuda', got {device!r}") from error
    if device.type == "meta":
        raise ValueError(f"{CALLER}: device must hold memory (cuda, cpu), got {device}")
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def read_config(path: Path) -> GptOssConfig:
    """The checkpoint's ``config.json`` (beside the file, or in the directory) as a GptOssConfig."""
    file = (path.parent if path.is_file() else path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{CALLER}: {file} does not exist (a gpt-oss checkpoint has its config.json beside the shards)")
    try:
        data = json.loads(file.read_text())
    except ValueError as error:
        raise CheckpointError(f"{CALLER}: {file} is not valid JSON ({error})") from None
    if data.get("model_type") != "gpt_oss":
        raise ValueError(f"{CALLER}: {file} describes model_type {data.get('model_type')!r}, not 'gpt_oss'")
    data.pop("quantization_config", None)  # the experts are ours, not transformers' quantizer's
    return GptOssConfig.from_dict(data)


def _expert_names(layers: int) -> set[str]:
    return {expert_tensor_name(i, w, p) for i in range(layers) for w in GPT_OSS_EXPERT_WEIGHTS for p in _EXPERT_PARTS}


def _dense_tensors(model: GptOssForCausalLM) -> dict[str, torch.Tensor]:
    """The model's own (non-expert) parameters and persistent buffers, by checkpoint name."""
    experts = {f"{name}.{weight}" for name, module in model.named_modules() if name.endswith("mlp.experts")
               for weight in (*DENSE_WEIGHTS, "gate_up_proj_bias", "down_proj_bias")}
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if name not in experts}


def _check_names(model: GptOssForCausalLM, checkpoint: ShardedCheckpoint, config: GptOssConfig) -> list[str]:
    """The non-expert names to load; every expected tensor's name, dtype and shape checked from the headers."""
    wanted = _dense_tensors(model)
    if config.tie_word_embeddings and "lm_head.weight" not in checkpoint:
        wanted.pop("lm_head.weight", None)  # tied to the embedding below
    expected = set(wanted) | _expert_names(config.num_hidden_layers)
    missing = sorted(name for name in expected if name not in checkpoint)
    unexpected = sorted(set(checkpoint.tensors) - expected)
    if missing:
        extra = "; it holds tensors the model does not expect: " + ", ".join(
            f"{name} (in {checkpoint.tensors[name].file.name})" for name in unexpected[:8]) if unexpected else ""
        raise KeyError(f"{CALLER}: {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} "
                       f"not found in the checkpoint {checkpoint.path}{extra}")
    if unexpected:  # as transformers does: said, not fatal (a newer checkpoint may carry more)
        warnings.warn(f"{CALLER}: the checkpoint {checkpoint.path} holds {len(unexpected)} tensor(s) this gpt-oss config "
                      "does not have, left out: " + ", ".join(f"{n} (in {checkpoint.tensors[n].file.name})"
                                                              for n in unexpected[:8]), RuntimeWarning, stacklevel=3)
    for name, tensor in wanted.items():
        checkpoint.check(name, tuple(tensor.shape), FLOATING, "the model's shape")
    for layer in range(config.num_hidden_layers):
        check_moe_layer(checkpoint, layer, config.num_local_experts, config.hidden_size, config.intermediate_size)
    return list(wanted)


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """``value`` (the whole tensor) in place of the meta placeholder ``name`` (this rank's shard, if a
    parallel plan made the placeholder a DTensor)."""
    owner, _, attribute = name.rpartition(".")
    module = model.get_submodule(owner)
    if attribute in module._parameters:
        placeholder = module._parameters[attribute]
        module._parameters[attribute] = torch.nn.Parameter(like_placeholder(value, placeholder),
                                                           requires_grad=placeholder.requires_grad)
    else:
        module._buffers[attribute] = like_placeholder(value, module._buffers[attribute])


def _load_dense(model: torch.nn.Module, checkpoint: ShardedCheckpoint, names: list[str], device: torch.device,
                dtype: torch.dtype) -> None:
    for name in names:
        # Cast on the host: the device receives the finished tensor and no temporary.
        _set_tensor(model, name, checkpoint.read(name).to(dtype).to(device))


def _load_experts(model: GptOssForCausalLM, checkpoint: ShardedCheckpoint, layer: int, rows: tuple[int, int],
                  device: torch.device, dtype: torch.dtype) -> None:
    config = model.config
    dims = (config.num_local_experts, config.hidden_size, config.intermediate_size)
    packed = read_moe_layer(checkpoint, layer, device, rows, dims)
    module = model.model.layers[layer].mlp.experts
    placeholders = {name: getattr(module, name) for name in ("gate_up_proj_bias", "down_proj_bias")}
    install_packed(module, packed.gate_up, packed.down, dtype)
    for name, bias in (("gate_up_proj_bias", packed.gate_up_bias), ("down_proj_bias", packed.down_bias)):
        # as stored (bf16 in gpt-oss); this rank's rows of an expert-sharded DTensor under expert parallelism
        setattr(module, name, torch.nn.Parameter(local_as_placeholder(bias, placeholders[name]), requires_grad=False))
    module.num_experts = rows[1] - rows[0]


def _materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Modules whose (non-persistent, computed) buffers are still on meta, rebuilt on the CPU and moved."""
    for name, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                raise RuntimeError(f"{CALLER}: cannot build the buffers of {name} ({type(module).__name__})")
            with torch.device("cpu"):
                fresh = type(module)(module.config)
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, fresh.to(device))
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{CALLER}: {', '.join(left[:5])} not loaded (still on the meta device)")


def _finish(model: GptOssForCausalLM, path: Path, dtype: torch.dtype) -> GptOssForCausalLM:
    model.config.dtype = dtype
    use_hopper_mxfp4(model, [layer.mlp.experts for layer in model.model.layers])
    generation = (path.parent if path.is_file() else path) / "generation_config.json"
    if generation.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(generation.parent))
    return model.eval()


def _rank_experts(model: GptOssForCausalLM, experts: object, sharded: bool) -> tuple[int, int]:
    """The experts to load: ``experts`` (checked), or under expert parallelism the rank's share (which an
    ``experts`` given as well must equal)."""
    total = model.config.num_local_experts
    rows = expert_range(experts, total, CALLER)
    if not sharded:
        return rows
    start, stop, _ = local_expert_range(model.model.layers[0].mlp.experts)
    if experts is not None and rows != (start, stop):
        raise ValueError(f"{CALLER}: experts = {rows} but distributed_config gives this rank experts ({start}, {stop}); "
                         "leave experts out under expert parallelism")
    return start, stop


def load_gpt_oss(
    path: str | Path, *, device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16,
    experts: tuple[int, int] | None = None, progress: bool = True, distributed_config: object | None = None,
) -> GptOssForCausalLM:
    """A ``GptOssForCausalLM`` from a gpt-oss MXFP4 checkpoint, running the ``"hopper_mxfp4"`` experts.

    ``path``: the checkpoint directory (``config.json`` and ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``), or its one ``.safetensors`` file. Non-expert tensors are loaded as
    ``dtype``; every layer's experts straight into packed MXFP4 (bit-exact), biases as stored; the experts
    modules hold no dense weight (``gate_up_proj`` / ``down_proj`` are empty). ``experts=(start, stop)``
    loads only that range of every layer's experts (the modules get ``num_experts = stop - start``; the
    routers keep all). ``progress``: a progress bar over the layers. Packing runs on ``device``.

    ``distributed_config``: a transformers ``DistributedConfig`` with ``ep_size > 1`` (for example
    ``DistributedConfig(tp_size=2, tp_plan="auto", ep_size=2)``, under ``torchrun --nproc-per-node 2``): the
    model is sharded as ``from_pretrained`` shards it, each rank reads and packs only its experts
    (``experts`` follows from the rank), and runs them under transformers' expert parallelism.
    """
    from tqdm.auto import tqdm

    requested, device = device, _check_options(device, dtype)
    root = Path(path)
    config = read_config(root)
    checkpoint = ShardedCheckpoint(root, CALLER)
    with torch.device("meta"):
        model = GptOssForCausalLM(copy.deepcopy(config))
    if distributed_config is not None:
        model = distribute_meta_model(model, distributed_config, CALLER)
        device = _check_options(requested, dtype)  # transformers bound this rank's accelerator: "cuda" is it now
    names = _check_names(model, checkpoint, config)
    rows = _rank_experts(model, experts, distributed_config is not None)
    layers = config.num_hidden_layers
    with torch.no_grad(), tqdm(total=layers + 1, desc=CALLER, unit="layer", disable=not progress) as bar:
        _load_dense(model, checkpoint, [n for n in names if not n.startswith("model.layers.")], device, dtype)
        bar.update()
        for layer in range(layers):
            prefix = f"model.layers.{layer}."
            _load_dense(model, checkpoint, [n for n in names if n.startswith(prefix)], device, dtype)
            _load_experts(model, checkpoint, layer, rows, device, dtype)
            bar.update()
        if config.tie_word_embeddings and "lm_head.weight" not in names:
            model.lm_head.weight = model.model.embed_tokens.weight  # one tensor, as transformers ties them
    _materialize_buffers(model, device)
    return _finish(model, root, dtype)
