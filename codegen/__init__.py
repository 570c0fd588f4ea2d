"""hopper-mxfp4's kernel generator: tile configs, rendering, NVRTC compile + cache, launch, tuning."""

from __future__ import annotations

from .build.config import DEFAULT_CONFIGS, TileConfig
from .build.render import render

__all__ = ["DEFAULT_CONFIGS", "TileConfig", "render", "compile_kernel", "compile_many", "select_config"]


def __getattr__(name: str):
    # The compiler and the tuning tables load lazily: importing codegen stays cheap.
    if name in ("compile_kernel", "compile_many"):
        from .build import compiler

        return getattr(compiler, name)
    if name == "select_config":
        from .tune.selection import select_config

        return select_config
    raise AttributeError(f"module 'codegen' has no attribute {name!r}")
