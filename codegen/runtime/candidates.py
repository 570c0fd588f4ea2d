"""Candidate builds everywhere, for a session on the GPU: ``HOPPER_MXFP4_CANDIDATES``.

A candidate is a kernel change built behind its macro and not shipped (launch.load's ``swiglu_lines``; the SwiGLU
sigmoid on the special-function unit was one until it shipped, the m-tile-fastest tile order one until it lost, in
benchmarks/NOTES.md's thirteenth session). `bench ncu-case --mma-roof` times it beside the shipped build and its own
GPU test checks its output; before it ships it should also run everything else the shipped build runs. With
``HOPPER_MXFP4_CANDIDATES=swiglu_lines`` (comma-separated names) every launch.load of a config a candidate applies to
takes the candidate build, so the whole `gpu` suite, `bench moe` and `bench e2e` run it: shipping it afterwards
changes no SASS from what ran (the macro's branch becomes the only one). Read once per process, since loaded kernels
and the layer's graphs are cached. Not for production: a candidate is not the product until it ships.
"""

from __future__ import annotations

import os
from functools import lru_cache

from codegen.build.config import LINE_STAGE_ROWS, TileConfig

ENV_CANDIDATES = "HOPPER_MXFP4_CANDIDATES"
CANDIDATES = ("swiglu_lines",)


@lru_cache(maxsize=1)
def environment_candidates() -> frozenset[str]:
    """The candidate names ``HOPPER_MXFP4_CANDIDATES`` lists (empty when unset); ValueError for an unknown name."""
    names = frozenset(name.strip() for name in os.environ.get(ENV_CANDIDATES, "").split(",") if name.strip())
    unknown = sorted(names - set(CANDIDATES))
    if unknown:
        raise ValueError(f"{ENV_CANDIDATES}: unknown candidate(s) {unknown}; expected names among {list(CANDIDATES)}")
    return names


def candidate_applies(name: str, config: TileConfig) -> bool:
    """Whether candidate ``name`` has a build for ``config``: the line stores for SwiGLU's tiles of whole 32-row
    blocks with room for their staging area beside the ring."""
    if config.epilogue != "swiglu":
        return False
    return name == "swiglu_lines" and config.tile_m % LINE_STAGE_ROWS == 0 and line_stage_room(config)


def line_stage_room(config: TileConfig) -> bool:
    """Whether the line stores' staging area fits beside ``config``'s ring (a SwiGLU config reserves none itself)."""
    return config.shared_memory_bytes + config.line_stage_area <= config.max_shared_memory_bytes


def candidate_flags(config: TileConfig) -> dict[str, bool]:
    """launch.load's flags for the candidates of ``HOPPER_MXFP4_CANDIDATES`` that apply to ``config``."""
    return {name: True for name in sorted(environment_candidates()) if candidate_applies(name, config)}
