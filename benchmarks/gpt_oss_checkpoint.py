"""Synthetic gpt-oss checkpoints in gpt-oss's on-disk MXFP4 format, at the real dimensions, random weights.

What ``openai/gpt-oss-20b`` / ``-120b`` hold, tensor for tensor: ``config.json`` (with its
``quantization_config``), bf16 attention (with sinks), router, embeddings, norms and ``lm_head``, and per
layer the experts as ``*_blocks`` uint8 ``[E, N, K/32, 16]`` (random bytes), ``*_scales`` uint8
``[E, N, K/32]`` (118..124: weights of about 2^-8 .. 2^-3 times the E2M1 values, so activations stay sane)
and bf16 ``*_bias``; sharded about ``shard_bytes`` per file with ``model.safetensors.index.json`` (one
``model.safetensors`` when it all fits one shard). Random bytes come from the GPU when there is one (the
120b checkpoint is about 65 GB); each tensor is generated, copied to the host and streamed into its shard
(safetensors written directly: one tensor in host memory at a time, no second copy of the shard).
``num_hidden_layers`` below the model's own gives its first layers at the real dimensions.

Shards go into ``directory`` while it has room and then into the ``spill`` directories (``spill/<name>/``),
each linked into ``directory`` by a symbolic link: one complete checkpoint, read through the links, spread
over a RAM disk and a disk when neither holds it alone.

A finished checkpoint is marked by ``synthetic.json`` (written last: the config, the seed, the files and
their sizes); :func:`ensure_checkpoint` reuses a directory whose mark matches and rewrites one that does
not (it removes only the files this module writes).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

FORMAT_VERSION = 2  # 2: shards streamed by our own safetensors writer, spill directories
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
SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.bfloat16: "BF16"}
ROOM_FACTOR, ROOM_SLACK = 1.02, 256 << 20  # a shard goes where free space > its bytes * 1.02 + 256 MiB


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


def full_layers(name: str) -> int:
    """The layer count of the published model ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    return int(MODELS[name]["num_hidden_layers"])


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


def layer_bytes(config: Any) -> int:
    """The checkpoint bytes of one layer (every layer holds the same tensors)."""
    return sum(spec.nbytes for spec in _layer_specs(config, 0))


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


def _header(specs: Sequence[Spec]) -> bytes:
    """A safetensors header for ``specs`` stored back to back in order: the length, then the JSON, padded with
    spaces so the data starts 8-byte aligned (as the format allows)."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _staging(specs: Sequence[Spec], device: torch.device) -> torch.Tensor | None:
    """One pinned host buffer for the largest tensor: device-to-host copies at full speed, allocated once."""
    if device.type != "cuda":
        return None
    return torch.empty(max(spec.nbytes for spec in specs), dtype=torch.uint8, pin_memory=True)


def _write_shard(path: Path, specs: Sequence[Spec], generator: torch.Generator, std: float, bar: Any,
                 staging: torch.Tensor | None) -> int:
    """Stream ``specs`` into a safetensors file: one tensor at a time generated, copied to the host, written."""
    with open(path, "wb") as file:
        file.write(_header(specs))
        for spec in specs:
            data = _generate(spec, generator, std).reshape(-1).view(torch.uint8)
            if staging is not None:
                host = staging[: data.numel()]
                host.copy_(data)
                data = host
            file.write(data.numpy().data)  # the buffer itself, no bytes copy
            bar.update(spec.nbytes)
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


def _written(directory: Path) -> list[Path]:
    """The files this module writes in ``directory`` (shards, links to spilled shards, index, config, mark)."""
    if not directory.is_dir():
        return []
    named = [directory / name for name in (MARK_FILE, "config.json", "generation_config.json")]
    return [*directory.glob("model*.safetensors*"), *(path for path in named if path.exists() or path.is_symlink())]


def _clear(directory: Path) -> None:
    """Remove what this module writes (and nothing else), a linked shard's target too."""
    for path in _written(directory):
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            if target.name.startswith("model") and target.name.endswith(".safetensors"):
                target.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def spill_path(spill: Path, directory: Path) -> Path:
    """Where ``directory``'s shards go in the spill directory ``spill``."""
    return spill / directory.name


def room(directory: Path) -> int:
    """Bytes a checkpoint written into ``directory`` can use: the free space there, plus what a rewrite would
    free there (this module's files in it, links excluded)."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    reclaim = sum(path.stat().st_size for path in _written(directory) if path.is_file() and not path.is_symlink())
    return shutil.disk_usage(probe).free + reclaim


def place_shards(sizes: Sequence[int], rooms: Sequence[int]) -> list[int] | None:
    """For each shard (in order) the first place with room for it, or None if some shard fits nowhere."""
    left = list(rooms)
    places = []
    for size in sizes:
        need = size * ROOM_FACTOR + ROOM_SLACK
        place = next((i for i, free in enumerate(left) if free >= need), None)
        if place is None:
            return None
        left[place] -= size
        places.append(place)
    return places


def places(directory: Path, spill: Sequence[Path] = ()) -> list[Path]:
    """Where shards may go, in order: ``directory``, then each spill directory on a file system not already
    listed (two places on one file system would count its free space twice)."""
    out, seen = [], set()
    for place in [directory, *(spill_path(Path(s), directory) for s in spill)]:
        probe = place
        while not probe.exists():
            probe = probe.parent
        device = probe.stat().st_dev
        if device not in seen:
            seen.add(device)
            out.append(place)
    return out


def _shard_dirs(places_: Sequence[Path], shards: dict[str, list[Spec]]) -> list[Path]:
    """The directory each shard is written into; OSError naming every place and the bytes needed."""
    sizes = [sum(spec.nbytes for spec in specs) for specs in shards.values()]
    rooms = [room(p) for p in places_]
    where = place_shards(sizes, rooms)
    if where is None:
        free = ", ".join(f"{p}: {r / 1e9:.1f} GB" for p, r in zip(places_, rooms))
        raise OSError(f"the checkpoint needs {sum(sizes) / 1e9:.1f} GB in shards of up to {max(sizes) / 1e9:.1f} GB; "
                      f"the room for it ({free}) is too small (choose other places with --dir / --spill-dir, "
                      "or fewer layers with --layers)")
    return [places_[i] for i in where]


def write_checkpoint(directory: Path, config: Any, *, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                     std: float = 0.02, progress: bool = True, spill: Sequence[Path] = ()) -> dict[str, int]:
    """Write the checkpoint of ``config`` into ``directory`` (shards that do not fit there into ``spill``,
    linked); returns {file: bytes}."""
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    where = places(directory, spill)
    for place in where:
        _clear(place)
    shards = plan_shards(tensor_specs(config), shard_bytes)
    targets = _shard_dirs(where, shards)
    saved = {**json.loads(config.to_json_string()), "quantization_config": QUANTIZATION_CONFIG}
    (directory / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    staging = _staging(tensor_specs(config), device)
    files = {}
    total = sum(spec.nbytes for specs in shards.values() for spec in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"write {directory.name}", disable=not progress) as bar:
        for (name, specs), target in zip(shards.items(), targets):
            target.mkdir(parents=True, exist_ok=True)
            files[name] = _write_shard(target / name, specs, generator, std, bar, staging)
            if target != directory:
                (directory / name).symlink_to(target / name)
    if len(shards) > 1:
        weight_map = {spec.name: name for name, specs in shards.items() for spec in specs}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def ensure_checkpoint(directory: Path, config: Any, *, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                      progress: bool = True, spill: Sequence[Path] = ()) -> dict[str, Any]:
    """The checkpoint of ``config`` in ``directory`` (shards that do not fit there in ``spill``): reused when
    its mark matches, else written.

    Returns {"path", "reused", "seconds", "bytes", "spilled"} (spilled: {spill directory: bytes} of the shards
    that went there)."""
    directory = Path(directory)
    mark = _mark(config, seed, shard_bytes)
    started = time.perf_counter()
    reused = _matching_mark(directory, mark)
    if not reused:
        files = write_checkpoint(directory, config, seed=seed, shard_bytes=shard_bytes, progress=progress, spill=spill)
        temporary = directory / f".{MARK_FILE}.tmp"
        temporary.write_text(json.dumps({**mark, "files": files}, indent=1) + "\n")
        os.replace(temporary, directory / MARK_FILE)  # the mark appears only when every shard is complete
    files = json.loads((directory / MARK_FILE).read_text())["files"]
    spilled: dict[str, int] = {}
    for name, size in files.items():
        if (directory / name).is_symlink():
            parent = str(Path(os.path.realpath(directory / name)).parent)
            spilled[parent] = spilled.get(parent, 0) + size
    return {"path": str(directory), "reused": reused, "seconds": time.perf_counter() - started,
            "bytes": sum(files.values()), "spilled": spilled}
