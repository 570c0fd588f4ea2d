"""The MXFP4 tensor as checkpoints store it (OCP Microscaling v1.0, gpt-oss byte order).

Logical shape ``[..., K]``: every run of 32 consecutive values along K shares one E8M0 scale.

* ``blocks``: uint8 ``[..., K/32, 16]``; byte ``j`` of a block holds element ``2j`` in its low
  nibble and element ``2j + 1`` in its high nibble (the gpt-oss safetensors order).
* ``scales``: uint8 ``[..., K/32]``; E8M0, value ``2**(s - 127)``, ``0xFF`` is NaN.

An E2M1 nibble is ``s e1 e0 m``: sign, two exponent bits (bias 1) and one mantissa bit, giving the
magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 32  # values that share one E8M0 scale
BYTES_PER_BLOCK = BLOCK_SIZE // 2

# E2M1 code -> value, index = the 4-bit code (sign in bit 3).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def describe_bytes(count: int) -> str:
    """``8.7 MB (8704000 bytes)``: a size for a repr, exact and readable."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit} ({count} bytes)"
    return f"{count} bytes"


@dataclass(frozen=True, repr=False)
class MXFP4Tensor:
    """Codes and scales of an MXFP4 tensor, in the checkpoint's byte order."""

    blocks: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, torch.Tensor) or not isinstance(self.scales, torch.Tensor):
            raise TypeError("MXFP4Tensor: blocks and scales must be torch.Tensors")
        if self.blocks.dtype != torch.uint8 or self.scales.dtype != torch.uint8:
            raise TypeError(
                f"MXFP4Tensor: blocks and scales must be uint8, got {self.blocks.dtype} and {self.scales.dtype}"
            )
        if self.blocks.dim() < 2 or self.blocks.shape[-1] != BYTES_PER_BLOCK:
            raise ValueError(
                f"MXFP4Tensor: blocks must have shape [..., K/32, 16], got {tuple(self.blocks.shape)}"
            )
        if tuple(self.scales.shape) != tuple(self.blocks.shape[:-1]):
            raise ValueError(
                "MXFP4Tensor: scales must have shape blocks.shape[:-1] "
                f"= {tuple(self.blocks.shape[:-1])}, got {tuple(self.scales.shape)}"
            )
        if self.blocks.device != self.scales.device:
            raise ValueError(
                f"MXFP4Tensor: blocks on {self.blocks.device} but scales on {self.scales.device}"
            )
        if self.blocks.shape[-2] == 0:  # quantize and the ops reject K = 0 too: no block, no value
            raise ValueError(
                f"MXFP4Tensor: blocks must hold at least one block of {BLOCK_SIZE} along K, got {tuple(self.blocks.shape)}"
            )

    def __repr__(self) -> str:
        size = self.blocks.numel() + self.scales.numel()
        return (
            f"MXFP4Tensor(shape={list(self.shape)}, format=MXFP4 (E2M1 codes, one E8M0 scale per {BLOCK_SIZE} "
            f"along K), device={self.device},\n            bytes={describe_bytes(size)})"
        )

    @property
    def shape(self) -> torch.Size:
        """The logical shape ``[..., K]``."""
        return torch.Size((*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK_SIZE))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def to(self, device: torch.device | str) -> "MXFP4Tensor":
        return MXFP4Tensor(self.blocks.to(device), self.scales.to(device))

    def codes(self) -> torch.Tensor:
        """The 4-bit codes as one uint8 per value, shape ``[..., K]``."""
        low = self.blocks & 0x0F
        high = self.blocks >> 4
        return torch.stack((low, high), dim=-1).reshape(self.shape)

    @staticmethod
    def from_codes(codes: torch.Tensor, scales: torch.Tensor) -> "MXFP4Tensor":
        """Inverse of :meth:`codes`: ``codes`` uint8 ``[..., K]`` (values 0..15)."""
        pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
        blocks = packed.reshape(*codes.shape[:-1], codes.shape[-1] // BLOCK_SIZE, BYTES_PER_BLOCK)
        return MXFP4Tensor(blocks.contiguous(), scales.contiguous())
