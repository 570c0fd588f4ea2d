"""Programmatic dependent launch (PDL) of our kernels: one switch for every launch site.

What it does: every kernel of ours starts with ``griddepcontrol.wait`` then ``griddepcontrol.launch_dependents``
(templates/mxfp4_dependent_launch.cuh), before any global access. With the switch on, each of our launches asks
the driver for programmatic stream serialization (``cuLaunchKernelEx``, codegen.runtime.fast_driver), and the
fused layer's graphs chain their kernel nodes with programmatic edges (codegen.runtime.graph_driver): a kernel's
CTAs may then land on the SMs while the kernel before it finishes, so its launch latency hides under that kernel's
tail. The results are the same bits either way: nothing of ours reads or writes global memory before the wait.

Why a switch, off by default: measured on an H100 (benchmarks/NOTES.md, ninth session), the FP8 layer at T = 1
gains 4 % and the quantizer + W4A8 pair about 1 µs, but the bf16 layer at T = 1 loses 3-6 %.
``HOPPER_MXFP4_PDL=1`` or ``set_dependent_launch(True)`` turns it on. The layer's graph caches key their graphs by this switch, so a graph built one way is never replayed
after the switch turns.
"""

from __future__ import annotations

import os

ENV_PDL = "HOPPER_MXFP4_PDL"

_enabled: bool | None = None  # set_dependent_launch(), else the environment variable (read once)


def set_dependent_launch(enabled: bool | None) -> None:
    """Launch our kernels with programmatic dependent launch (True), plainly (False, the default), or follow
    ``HOPPER_MXFP4_PDL`` again (None)."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_dependent_launch: enabled must be a bool or None, got {type(enabled).__name__} {enabled!r}")
    _enabled = enabled


def dependent_launch_enabled() -> bool:
    """Whether our launches (and the layer's graphs built from now on) use programmatic dependent launch."""
    global _enabled
    if _enabled is None:
        value = os.environ.get(ENV_PDL, "0").strip().lower()
        if value not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
            raise ValueError(f"{ENV_PDL}={value!r}: expected 0 or 1 (also false/true, no/yes, off/on)")
        _enabled = value in ("1", "true", "yes", "on")
    return _enabled
