"""Synthetic gpt-oss checkpoints in gpt-oss's on-disk MXFP4 format, at the real dimensions, random weights.

What ``openai/gpt-oss-20b`` / ``-120b`` hold, tensor for tensor: ``config.json`` (with its
``quantization_config``), bf16 attention (with sinks), router, embeddings, norms and ``lm_head``, and per
layer the experts as ``*_blocks`` uint8 ``[E, N, K/32, 16]`` (random bytes), ``*_scales`` uint8
``[E, N, K/32]`` (118..124: weights of about 2^-8 .. 2^-3 times the E2M1 values, so activations stay sane)
and bf16 ``*_bias``; sharded about ``shard_bytes`` per file with ``model.safetensors.index.json`` (one
``model.safetensors`` when it all fits one shard). Random bytes come from the GPU when there is one (the
120b checkpoint is about 65 GB); each shard is generated, written and freed before the next.

A finished checkpoint is marked by ``synthetic.json`` (written last: the config, the seed, the files and
their sizes); :func:`ensure_checkpoint` reuses a directory whose mark matches and rewrites one that does
not (it removes only the files this module writes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

FORMAT_VERSION = 1
MARK_FILE = "synthetic.json"
SHARD_BYTES = 5 * 10**9
# The published configs' values that differ from transformers' GptOssConfig defaults (which are the 120b's).
MODELS: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32, eos_token_id=200002, pad_token_id=199999),
    "gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128, eos_token_id=200002, pad_token_id=199999),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                 max_position_embeddings=4096),
}
QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
}
SCALE_RANGE = (118, 125)  # E8M0 bytes drawn from [118, 125)


@dataclass(frozen=True)
class Spec:
    """One tensor of the checkpoint: name, shape, and what it holds ("blocks", "scales", "ones" or "normal")."""

    name: str
    shape: tuple[int, ...]
    kind: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.kind in ("blocks", "scales") else torch.bfloat16

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * (1 if self.dtype == torch.uint8 else 2)


def model_config(name: str, **overrides: Any) -> Any:
    """The GptOssConfig of ``name`` (a key of MODELS), with ``overrides``."""
    from transformers import GptOssConfig

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    return GptOssConfig(**{**MODELS[name], **overrides})


def _layer_specs(config: Any, layer: int) -> Iterator[Spec]:
    h, heads, kv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    e, inter = config.num_local_experts, config.intermediate_size
    prefix = f"model.layers.{layer}."
    yield Spec(prefix + "input_layernorm.weight", (h,), "ones")
    for proj, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
        yield Spec(f"{prefix}self_attn.{proj}.weight", (rows, h), "normal")
        yield Spec(f"{prefix}self_attn.{proj}.bias", (rows,), "normal")
    yield Spec(prefix + "self_attn.o_proj.weight", (h, heads * d), "normal")
    yield Spec(prefix + "self_attn.o_proj.bias", (h,), "normal")
    yield Spec(prefix + "self_attn.sinks", (heads,), "normal")
    yield Spec(prefix + "post_attention_layernorm.weight", (h,), "ones")
    yield Spec(prefix + "mlp.router.weight", (e, h), "normal")
    yield Spec(prefix + "mlp.router.bias", (e,), "normal")
    for weight, (n, k) in (("gate_up_proj", (2 * inter, h)), ("down_proj", (h, inter))):
        yield Spec(f"{prefix}mlp.experts.{weight}_blocks", (e, n, k // 32, 16), "blocks")
        yield Spec(f"{prefix}mlp.experts.{weight}_scales", (e, n, k // 32), "scales")
        yield Spec(f"{prefix}mlp.experts.{weight}_bias", (e, n), "normal")


def tensor_specs(config: Any) -> list[Spec]:
    """Every tensor of a gpt-oss checkpoint of ``config``, in file order."""
    specs = [Spec("model.embed_tokens.weight", (config.vocab_size, config.hidden_size), "normal")]
    for layer in range(config.num_hidden_layers):
        specs.extend(_layer_specs(config, layer))
    specs.append(Spec("model.norm.weight", (config.hidden_size,), "ones"))
    specs.append(Spec("lm_head.weight", (config.vocab_size, config.hidden_size), "normal"))
    return specs


def checkpoint_bytes(config: Any) -> int:
    return sum(spec.nbytes for spec in tensor_specs(config))


def plan_shards(specs: list[Spec], shard_bytes: int) -> dict[str, list[Spec]]:
    """File name -> its tensors, filled in order up to about ``shard_bytes`` each."""
    groups: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": group for i, group in enumerate(groups)}


def _generate(spec: Spec, generator: torch.Generator, std: float) -> torch.Tensor:
    device = generator.device
    if spec.kind == "blocks":
        return torch.randint(0, 256, spec.shape, generator=generator, device=device, dtype=torch.uint8)
    if spec.kind == "scales":
        return torch.randint(*SCALE_RANGE, spec.shape, generator=generator, device=device, dtype=torch.uint8)
    if spec.kind == "ones":
        return torch.ones(spec.shape, dtype=torch.bfloat16, device=device)
    return (torch.randn(spec.shape, generator=generator, device=device) * std).to(torch.bfloat16)


def _write_shard(path: Path, specs: list[Spec], generator: torch.Generator, std: float, bar: Any) -> int:
    from safetensors.torch import save_file

    tensors = {}
    for spec in specs:
        tensors[spec.name] = _generate(spec, generator, std).cpu()
        bar.update(spec.nbytes)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def _mark(config: Any, seed: int, shard_bytes: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "seed": seed, "shard_bytes": shard_bytes, "config": json.loads(config.to_json_string())}


def _matching_mark(directory: Path, mark: dict[str, Any]) -> bool:
    try:
        found = json.loads((directory / MARK_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = found.pop("files", {})
    return found == mark and all((directory / name).is_file() and (directory / name).stat().st_size == size
                                 for name, size in files.items())


def _clear(directory: Path) -> None:
    """Remove what this module writes (and nothing else)."""
    for path in directory.glob("model*.safetensors*"):
        path.unlink()
    for name in (MARK_FILE, "config.json", "generation_config.json"):
        (directory / name).unlink(missing_ok=True)


def _check_room(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed * 1.02:
        raise OSError(f"{directory} has {free / 1e9:.1f} GB free; the checkpoint needs {needed / 1e9:.1f} GB "
                      "(choose another place with --dir)")


def write_checkpoint(directory: Path, config: Any, *, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                     std: float = 0.02, progress: bool = True) -> dict[str, int]:
    """Write the checkpoint of ``config`` into ``directory``; returns {file: bytes}."""
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    _clear(directory)
    shards = plan_shards(tensor_specs(config), shard_bytes)
    _check_room(directory, sum(spec.nbytes for specs in shards.values() for spec in specs))
    saved = {**json.loads(config.to_json_string()), "quantization_config": QUANTIZATION_CONFIG}
    (directory / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    generator = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    files = {}
    total = sum(spec.nbytes for specs in shards.values() for spec in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"write {directory.name}", disable=not progress) as bar:
        for name, specs in shards.items():
            files[name] = _write_shard(directory / name, specs, generator, std, bar)
    if len(shards) > 1:
        weight_map = {spec.name: name for name, specs in shards.items() for spec in specs}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def ensure_checkpoint(directory: Path, config: Any, *, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                      progress: bool = True) -> dict[str, Any]:
    """The checkpoint of ``config`` in ``directory``: reused when its mark matches, else written.

    Returns {"path", "reused", "seconds", "bytes"}."""
    directory = Path(directory)
    mark = _mark(config, seed, shard_bytes)
    started = time.perf_counter()
    reused = _matching_mark(directory, mark)
    if not reused:
        files = write_checkpoint(directory, config, seed=seed, shard_bytes=shard_bytes, progress=progress)
        temporary = directory / f".{MARK_FILE}.tmp"
        temporary.write_text(json.dumps({**mark, "files": files}, indent=1) + "\n")
        os.replace(temporary, directory / MARK_FILE)  # the mark appears only when every shard is complete
    files = json.loads((directory / MARK_FILE).read_text())["files"]
    return {"path": str(directory), "reused": reused, "seconds": time.perf_counter() - started, "bytes": sum(files.values())}
