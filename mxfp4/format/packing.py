"""``mxfp4.pack`` / ``mxfp4.unpack``: the packed layout a weight is stored in, chosen by the activations it
will meet: bf16 (the plain layout, :mod:`mxfp4.format.layout`) or FP8 e4m3 (the FP8-ready layout,
:mod:`mxfp4.format.layout_fp8`). Both are documented in :mod:`mxfp4.format.layout`."""

from __future__ import annotations

from .layout import PackedMXFP4
from .layout import pack as pack_bf16
from .layout import unpack as unpack_bf16
from .layout_fp8 import PackedMXFP4FP8, pack_fp8, unpack_fp8
from .tensor import MXFP4Tensor

ACTIVATIONS = ("bf16", "fp8")


def check_activations(op: str, activations: object) -> str:
    """``activations``, after checking that it names one of :data:`ACTIVATIONS`."""
    if not isinstance(activations, str):
        raise TypeError(f"{op}: activations must be a str, got {type(activations).__name__}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"{op}: activations must be one of {ACTIVATIONS}, got {activations!r}")
    return activations


def pack(weight: MXFP4Tensor, *, activations: str = "bf16") -> PackedMXFP4 | PackedMXFP4FP8:
    """Pack an MXFP4 weight ``[E, N, K]`` (or ``[N, K]``) once, at load time, for the kernels.

    ``activations="bf16"`` (default): the plain layout (:class:`PackedMXFP4`) that the W4A16 kernels read,
    bit-exact and invertible. ``activations="fp8"``: the FP8-ready layout (:class:`PackedMXFP4FP8`) that the
    W4A8 kernels read, with the E8M0 block scales folded into e4m3 weight values and one scale per row (see
    its ``rerounded_blocks``). Plain packed weights also work with FP8 activations, on a slower path.
    """
    if check_activations("pack", activations) == "fp8":
        return pack_fp8(weight)
    return pack_bf16(weight)


def unpack(packed: PackedMXFP4 | PackedMXFP4FP8) -> MXFP4Tensor:
    """The weight ``[E, N, K]`` back from either packed layout (the FP8-ready one: as it holds it, re-rounded
    blocks included)."""
    if isinstance(packed, PackedMXFP4FP8):
        return unpack_fp8(packed)
    return unpack_bf16(packed)
