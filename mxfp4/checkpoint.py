"""Import and export of MXFP4 weights as checkpoints store them: gpt-oss safetensors and ggml.

gpt-oss stores each expert weight as two tensors with the MXFP4Tensor byte order exactly:
``model.layers.{i}.mlp.experts.{name}_blocks`` uint8 ``[E, N, K/32, 16]`` and ``..._scales`` uint8
``[E, N, K/32]``, so import is a check and a wrap (bit-exact, no copy). N is the output features
(``gate_up_proj``: ``[E, 2I, H]``, gate and up rows interleaved; ``down_proj``: ``[E, H, I]``), the
orientation ``mxfp4.pack`` takes; transformers' modules hold the same weights transposed, ``[E, K, N]``.
The biases ``..._bias`` (``[E, N]``, bf16) are plain tensors.

ggml's ``block_mxfp4`` is 17 bytes per block of 32 values: the E8M0 byte, then 16 bytes ``qs``
where ``qs[j]`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble.
Shapes here are torch order, ``[..., K]`` with K innermost (ggml's ``ne[0]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .gate_up import pack_for_moe
from .layout import PackedMXFP4, pack
from .tensor import BLOCK_SIZE, BYTES_PER_BLOCK, MXFP4Tensor

GGML_BLOCK_BYTES = 1 + BYTES_PER_BLOCK  # 17
GPT_OSS_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def from_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor) -> MXFP4Tensor:
    """Wrap gpt-oss ``*_blocks`` uint8 ``[..., K/32, 16]`` and ``*_scales`` uint8 ``[..., K/32]``."""
    for name, tensor in (("blocks", blocks), ("scales", scales)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"from_gpt_oss: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != torch.uint8:
            raise TypeError(f"from_gpt_oss: {name} must be uint8, got {tensor.dtype}")
    return MXFP4Tensor(blocks.contiguous(), scales.contiguous())


def _shard_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"load_gpt_oss_experts: {path} is neither a file nor a directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_gpt_oss_experts: no *.safetensors files in {path}")
    return files


def _locate(files: list[Path], names: list[str]) -> dict[str, Path]:
    """Which shard holds each tensor name (the index file when there is one, else the headers)."""
    from safetensors import safe_open

    found: dict[str, Path] = {}
    index = files[0].parent / "model.safetensors.index.json"
    if len(files) > 1 and index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        found = {name: files[0].parent / weight_map[name] for name in names if name in weight_map}
    for file in files:
        if len(found) == len(names):
            break
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
        for name in names:
            if name in keys and name not in found:
                found[name] = file
    return found


def _read_tensors(
    path: str | Path, names: list[str], optional: list[str], device: torch.device | str, caller: str
) -> dict[str, torch.Tensor]:
    """Read ``names`` (all required) and whichever of ``optional`` exist from a file or directory of shards."""
    from safetensors import safe_open

    files = _shard_files(Path(path))
    where = _locate(files, names + optional)
    missing = [name for name in names if name not in where]
    if missing:
        raise KeyError(f"{caller}: {', '.join(missing)} not found in {path}")
    loaded: dict[str, torch.Tensor] = {}
    for name in names + optional:
        if name in where:
            with safe_open(str(where[name]), framework="pt", device=str(device)) as handle:
                loaded[name] = handle.get_tensor(name)
    return loaded


def load_gpt_oss_experts(
    path: str | Path, layer: int, device: torch.device | str = "cpu"
) -> dict[str, MXFP4Tensor | torch.Tensor]:
    """The MXFP4 expert weights and biases of one layer of a gpt-oss checkpoint.

    ``path`` is a ``.safetensors`` file or a directory of shards. Returns
    ``{"gate_up_proj": [E, 2 * I, H], "down_proj": [E, H, I]}`` as MXFP4Tensors (logical shapes, the
    checkpoint's ``[E, N, K]`` orientation: N = output features; transformers' modules hold the
    dequantized weights transposed, ``[E, K, N]``), plus ``"gate_up_proj_bias"`` ``[E, 2 * I]`` and
    ``"down_proj_bias"`` ``[E, H]`` as stored (bf16 in gpt-oss) when the checkpoint has them.
    """
    prefix = f"model.layers.{int(layer)}.mlp.experts."
    names = [f"{prefix}{weight}_{part}" for weight in GPT_OSS_EXPERT_WEIGHTS for part in ("blocks", "scales")]
    biases = [f"{prefix}{weight}_bias" for weight in GPT_OSS_EXPERT_WEIGHTS]
    loaded = _read_tensors(path, names, biases, device, "load_gpt_oss_experts")
    result: dict[str, MXFP4Tensor | torch.Tensor] = {
        weight: from_gpt_oss(loaded[f"{prefix}{weight}_blocks"], loaded[f"{prefix}{weight}_scales"])
        for weight in GPT_OSS_EXPERT_WEIGHTS
    }
    for weight in GPT_OSS_EXPERT_WEIGHTS:
        if f"{prefix}{weight}_bias" in loaded:
            result[f"{weight}_bias"] = loaded[f"{prefix}{weight}_bias"]
    return result


@dataclass(frozen=True)
class GptOssMoELayer:
    """One gpt-oss layer's experts, ready for ``mxfp4.moe``: packed ``[E, 2I, H]`` (gate/up rows paired,
    ``mxfp4.pack_gate_up``, when I is a multiple of 8) / ``[E, H, I]`` + biases."""

    gate_up: PackedMXFP4
    down: PackedMXFP4
    gate_up_bias: torch.Tensor | None  # [E, 2I]
    down_bias: torch.Tensor | None  # [E, H]

    def to(self, device: torch.device | str) -> "GptOssMoELayer":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GptOssMoELayer(self.gate_up.to(device), self.down.to(device), move(self.gate_up_bias), move(self.down_bias))


def load_gpt_oss_moe_layer(
    path: str | Path, layer: int, device: torch.device | str | None = None
) -> GptOssMoELayer:
    """Load and pack one layer's experts (bit-exact checkpoint bytes) in one call, on ``device`` (CPU if None).

    ``mxfp4.moe(x, ids, weights, l.gate_up, l.down, gate_up_bias=l.gate_up_bias, down_bias=l.down_bias)``
    with ``l`` the result computes the layer.
    """
    loaded = load_gpt_oss_experts(path, layer, "cpu" if device is None else device)
    gate_up, down = loaded["gate_up_proj"], loaded["down_proj"]
    if gate_up.shape[0] != down.shape[0] or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
        raise ValueError(
            f"load_gpt_oss_moe_layer: layer {layer} has gate_up_proj {list(gate_up.shape)} and down_proj "
            f"{list(down.shape)}; expected [E, 2I, H] and [E, H, I]"
        )
    return GptOssMoELayer(pack_for_moe(gate_up), pack(down), loaded.get("gate_up_proj_bias"), loaded.get("down_proj_bias"))


def _as_uint8_tensor(data: object) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"from_ggml: data must be uint8, got {data.dtype}")
        return data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:  # torch.frombuffer rejects an empty buffer; an empty tensor is valid input
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"from_ggml: data must be uint8, got {data.dtype}")
        return torch.from_numpy(np.ascontiguousarray(data).reshape(-1))
    raise TypeError(f"from_ggml: data must be a uint8 tensor, numpy array or bytes, got {type(data).__name__}")


def _ggml_shape(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints; TypeError/ValueError naming it otherwise."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"from_ggml: shape must be a tuple of ints such as (E, N, K), got {type(shape).__name__} {shape!r}")
    if not all(isinstance(size, (int, np.integer)) and not isinstance(size, bool) for size in shape):
        raise TypeError(f"from_ggml: shape must be a tuple of ints, got {shape!r}")
    if any(size < 0 for size in shape):
        raise ValueError(f"from_ggml: shape must not have negative sizes, got {tuple(shape)}")
    return tuple(int(size) for size in shape)


def from_ggml(data: torch.Tensor | np.ndarray | bytes, shape: tuple[int, ...] | torch.Size) -> MXFP4Tensor:
    """Decode a ggml MXFP4 tensor (``block_mxfp4`` bytes) of logical ``shape`` ``[..., K]``."""
    shape = _ggml_shape(shape)
    if not shape or shape[-1] % BLOCK_SIZE:
        raise ValueError(f"from_ggml: shape must end in a multiple of {BLOCK_SIZE} (K), got {shape}")
    raw = _as_uint8_tensor(data)
    num_blocks = int(np.prod(shape, dtype=np.int64)) // BLOCK_SIZE
    if raw.numel() != num_blocks * GGML_BLOCK_BYTES:
        raise ValueError(
            f"from_ggml: data has {raw.numel()} bytes; shape {shape} needs "
            f"{num_blocks} blocks x {GGML_BLOCK_BYTES} = {num_blocks * GGML_BLOCK_BYTES}"
        )
    ggml_blocks = raw.view(num_blocks, GGML_BLOCK_BYTES)
    scales = ggml_blocks[:, 0]
    qs = ggml_blocks[:, 1:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # elements 0..15, then 16..31
    blocks = codes[:, 0::2] | (codes[:, 1::2] << 4)  # gpt-oss: element 2j low, 2j + 1 high
    return MXFP4Tensor(
        blocks.reshape(*shape[:-1], shape[-1] // BLOCK_SIZE, BYTES_PER_BLOCK).contiguous(),
        scales.reshape(*shape[:-1], shape[-1] // BLOCK_SIZE).contiguous(),
    )


def to_ggml(t: MXFP4Tensor) -> torch.Tensor:
    """The ``block_mxfp4`` bytes of ``t``, uint8 ``[num_blocks * 17]`` in row-major block order."""
    if not isinstance(t, MXFP4Tensor):
        raise TypeError(f"to_ggml: t must be an MXFP4Tensor, got {type(t).__name__}")
    blocks = t.blocks.reshape(-1, BYTES_PER_BLOCK)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(-1, BLOCK_SIZE)
    qs = codes[:, :16] | (codes[:, 16:] << 4)
    return torch.cat((t.scales.reshape(-1, 1), qs), dim=-1).reshape(-1).contiguous()
