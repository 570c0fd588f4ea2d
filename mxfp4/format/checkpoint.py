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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .gate_up import pack_for_moe
from .layout import PackedMXFP4, pack
from .shards import FLOATING, CheckpointError, ShardedCheckpoint
from .tensor import BLOCK_SIZE, BYTES_PER_BLOCK, MXFP4Tensor

GGML_BLOCK_BYTES = 1 + BYTES_PER_BLOCK  # 17
GPT_OSS_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_PACK_CHUNK_VALUES = 1 << 24  # weight values packed per step while loading (one gpt-oss gate_up expert)


def from_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor) -> MXFP4Tensor:
    """Wrap gpt-oss ``*_blocks`` uint8 ``[..., K/32, 16]`` and ``*_scales`` uint8 ``[..., K/32]``."""
    for name, tensor in (("blocks", blocks), ("scales", scales)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"from_gpt_oss: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != torch.uint8:
            raise TypeError(f"from_gpt_oss: {name} must be uint8, got {tensor.dtype}")
    return MXFP4Tensor(blocks.contiguous(), scales.contiguous())


def expert_tensor_name(layer: int, weight: str, part: str) -> str:
    """``model.layers.{layer}.mlp.experts.{weight}_{part}``; part: "blocks", "scales" or "bias"."""
    return f"model.layers.{layer}.mlp.experts.{weight}_{part}"


def gpt_oss_expert_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(N, K) of each expert weight: ``gate_up_proj`` [2I, H], ``down_proj`` [H, I]."""
    return {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}


def _layer_index(layer: object, caller: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"{caller}: layer must be an int (a layer index), got {type(layer).__name__} {layer!r}")
    if layer < 0:
        raise ValueError(f"{caller}: layer must be >= 0, got {layer}")
    return int(layer)


def expert_range(experts: object, num_experts: int, caller: str) -> tuple[int, int]:
    """``experts`` (None: all, or ``(start, stop)`` with 0 <= start < stop <= E) as a pair of ints."""
    if experts is None:
        return 0, num_experts
    if not isinstance(experts, (tuple, list)) or len(experts) != 2 or not all(
        isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in experts
    ):
        raise TypeError(f"{caller}: experts must be None or a pair of ints (start, stop), got {experts!r}")
    start, stop = int(experts[0]), int(experts[1])
    if not 0 <= start < stop <= num_experts:
        raise ValueError(f"{caller}: experts = ({start}, {stop}) must satisfy 0 <= start < stop <= E = {num_experts}")
    return start, stop


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
    caller = "load_gpt_oss_experts"
    layer = _layer_index(layer, caller)
    checkpoint = ShardedCheckpoint(path, caller)
    result: dict[str, MXFP4Tensor | torch.Tensor] = {}
    for weight in GPT_OSS_EXPERT_WEIGHTS:
        blocks, scales = (expert_tensor_name(layer, weight, part) for part in ("blocks", "scales"))
        checkpoint.info(blocks), checkpoint.info(scales)  # KeyError naming the tensor before any read
        result[weight] = from_gpt_oss(checkpoint.read(blocks).to(device), checkpoint.read(scales).to(device))
    for weight in GPT_OSS_EXPERT_WEIGHTS:
        if expert_tensor_name(layer, weight, "bias") in checkpoint:
            result[f"{weight}_bias"] = checkpoint.read(expert_tensor_name(layer, weight, "bias")).to(device)
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


def _dims_from_headers(checkpoint: ShardedCheckpoint, layer: int, caller: str) -> tuple[int, int, int]:
    """(E, H, I) of a layer as its block tensors' headers give them, checked against each other."""
    gate_up = checkpoint.info(expert_tensor_name(layer, "gate_up_proj", "blocks")).shape
    down = checkpoint.info(expert_tensor_name(layer, "down_proj", "blocks")).shape
    if len(gate_up) != 4 or len(down) != 4:
        raise CheckpointError(f"{caller}: layer {layer}'s *_blocks must be 4-D [E, N, K/32, 16], got {list(gate_up)} and {list(down)}")
    e, two_i, h = gate_up[0], gate_up[1], gate_up[2] * BLOCK_SIZE
    inter = down[2] * BLOCK_SIZE
    if down[0] != e or two_i != 2 * inter or down[1] != h:
        raise ValueError(
            f"{caller}: layer {layer} has gate_up_proj [{e}, {two_i}, {h}] and down_proj [{down[0]}, {down[1]}, "
            f"{inter}]; expected [E, 2I, H] and [E, H, I]"
        )
    return e, h, inter


def check_moe_layer(checkpoint: ShardedCheckpoint, layer: int, num_experts: int, hidden: int, intermediate: int) -> None:
    """Every expert tensor of ``layer`` has gpt-oss's dtype and shape for (E, H, I); errors name file and tensor."""
    for weight, (n, k) in gpt_oss_expert_shapes(hidden, intermediate).items():
        blocks, scales = (expert_tensor_name(layer, weight, part) for part in ("blocks", "scales"))
        checkpoint.check(blocks, (num_experts, n, k // BLOCK_SIZE, BYTES_PER_BLOCK), ("U8",), "[E, N, K/32, 16]")
        checkpoint.check(scales, (num_experts, n, k // BLOCK_SIZE), ("U8",), "[E, N, K/32]")
        bias = expert_tensor_name(layer, weight, "bias")
        if bias in checkpoint:
            checkpoint.check(bias, (num_experts, n), FLOATING, "[E, N]")


def _read_packed(
    checkpoint: ShardedCheckpoint, layer: int, weight: str, rows: tuple[int, int], device: torch.device | str, packer: Any,
) -> PackedMXFP4:
    """One expert weight's experts ``rows``, packed on ``device`` a few experts at a time (bounded temporaries)."""
    blocks = checkpoint.read(expert_tensor_name(layer, weight, "blocks"), rows)
    scales = checkpoint.read(expert_tensor_name(layer, weight, "scales"), rows)
    count, n, k = blocks.shape[0], blocks.shape[1], blocks.shape[2] * BLOCK_SIZE
    step = max(1, _PACK_CHUNK_VALUES // max(1, n * k))
    out, kind = None, PackedMXFP4
    for e0 in range(0, count, step):
        packed = packer(MXFP4Tensor(blocks[e0 : e0 + step].to(device), scales[e0 : e0 + step].to(device)))
        if out is None:
            out = torch.empty((count, *packed.data.shape[1:]), dtype=torch.uint8, device=packed.data.device)
            kind = type(packed)  # PackedGateUp when the gate/up rows were paired
        out[e0 : e0 + step] = packed.data
        del packed  # before the next chunk: the temporaries stay one chunk's worth
    return kind(out, n, k)


def read_moe_layer(
    checkpoint: ShardedCheckpoint, layer: int, device: torch.device | str,
    experts: tuple[int, int] | None = None, dims: tuple[int, int, int] | None = None,
) -> GptOssMoELayer:
    """Layer ``layer``'s experts (``experts``: a (start, stop) range, default all) packed on ``device``.

    ``dims`` = (E, H, I) expected (a model's config); None: taken from the checkpoint's headers."""
    num_experts, hidden, intermediate = dims or _dims_from_headers(checkpoint, layer, checkpoint.caller)
    check_moe_layer(checkpoint, layer, num_experts, hidden, intermediate)
    rows = expert_range(experts, num_experts, checkpoint.caller)
    gate_up = _read_packed(checkpoint, layer, "gate_up_proj", rows, device, pack_for_moe)
    down = _read_packed(checkpoint, layer, "down_proj", rows, device, pack)
    biases = [
        checkpoint.read(name, rows).to(device) if name in checkpoint else None
        for name in (expert_tensor_name(layer, weight, "bias") for weight in GPT_OSS_EXPERT_WEIGHTS)
    ]
    return GptOssMoELayer(gate_up, down, *biases)


def load_gpt_oss_moe_layer(
    path: str | Path, layer: int, device: torch.device | str | None = None, experts: tuple[int, int] | None = None,
) -> GptOssMoELayer:
    """Load and pack one layer's experts (bit-exact checkpoint bytes) in one call, on ``device`` (CPU if None).

    ``experts=(start, stop)`` loads only that range of experts (E = stop - start). ``mxfp4.moe(x, ids,
    weights, l.gate_up, l.down, gate_up_bias=l.gate_up_bias, down_bias=l.down_bias)`` with ``l`` the
    result computes the layer.
    """
    caller = "load_gpt_oss_moe_layer"
    layer = _layer_index(layer, caller)
    return read_moe_layer(ShardedCheckpoint(path, caller), layer, "cpu" if device is None else device, experts)


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
