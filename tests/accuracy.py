"""The tests' relative error against a float64 reference, shared by the CPU and GPU suites.

``||out - ref|| / ||ref||`` in float64. An all-zero reference (every choice of a token foreign to this rank,
say) asks for an exactly-zero output: the error is then 0.0 for an all-zero ``out`` and inf otherwise. Never
0 / 0 = NaN, which fails every bound for the wrong reason, and no tiny clamp of ``||ref||``, which would let
a small nonzero output pass. A NaN in ``out`` gives NaN or inf: it fails every bound.
"""

from __future__ import annotations

import math

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    difference = float((out.double() - ref.double()).norm())
    scale = float(ref.double().norm())
    if scale == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / scale
