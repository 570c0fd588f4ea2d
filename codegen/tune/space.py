"""The search space of a sweep: which tile configs it tries (``SearchSpace``, ``enumerate_configs``) and, per M,
which of them are worth measuring (``tile_m_window``, ``configs_for_m``).

The default space is a subset of what ``TileConfig.validate`` allows, computed from its limits in
``codegen.build.config`` so that a changed limit changes the sweep too. The sweep is :mod:`codegen.tune.sweep`; the
tables it writes, :mod:`codegen.tune.tables`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

from codegen.build.config import (
    CTAS_PER_SM_CHOICES,
    DEFAULT_CONFIGS,
    DEFAULT_FRAGMENT_BUFFERS,
    FRAGMENT_BUFFER_CHOICES,
    MAX_ATOMS_PER_WARPGROUP,
    MAX_TILE_K,
    MIN_STAGES,
    PRODUCERS,
    TILE_M_RANGE,
    WARPGROUP_CHOICES,
    TileConfig,
)
from mxfp4.format.layout import ATOM_K, ATOM_N

from .tables import m_bucket


def _powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """``low, 2 low, 4 low, ...`` up to ``high``."""
    return tuple(low << i for i in range(max(0, (high // low).bit_length())) if low << i <= high)


# The default sweep: a subset of what ``TileConfig.validate`` allows, computed from its limits in
# ``codegen.build.config`` so that a changed limit changes the sweep too.
_SWEEP_TILE_N = tuple(ATOM_N * atoms for atoms in range(1, MAX_ATOMS_PER_WARPGROUP + 1))  # 64 .. 256
# The warpgroup counts that split the widest swept tile_n into whole atoms evenly (1, 2, 4).
_SWEEP_WARPGROUPS = tuple(w for w in WARPGROUP_CHOICES if (_SWEEP_TILE_N[-1] // ATOM_N) % w == 0)
# Powers of two over the legal range, and three quarters of the largest (192).
_SWEEP_TILE_M = tuple(sorted({*_powers_of_two(*TILE_M_RANGE), TILE_M_RANGE[1] * 3 // 4}))
# From one atom deep, in powers of two, stopping one short of MAX_TILE_K (64, 128, 256).
_SWEEP_TILE_K = _powers_of_two(ATOM_K, MAX_TILE_K // 2)
_SWEEP_MAX_STAGES = 10  # a cap of the sweep, not of the kernel (shared memory bounds that)
# One fat CTA per SM and three to five light ones: on the H100 two gained nothing over one and four
# (with a producer warpgroup) fit only 64-row tiles, which lost to three (benchmarks/NOTES.md, v3);
# a producer warp leaves room for four or five. SearchSpace.full() tries them all.
_SWEEP_CTAS_PER_SM = tuple(c for c in CTAS_PER_SM_CHOICES if c in (1, 3, 4, 5))
# Stream-K pays where the tiles fill the grid in few waves: decode-sized tiles on light CTAs.
_STREAM_K_MAX_TILE_M = 16
# Deeper fragment buffering (a third register buffer: two WGMMA chunks in flight while the next decodes) is for
# tiles whose WGMMAs are long enough that the tensor pipe idles behind a chunk's decode: M = 64 and prefill tiles, on
# the fat-CTA shapes that the tables pick there (one CTA per SM, two or more consumer warpgroups).
_DEEP_FRAGMENTS_MIN_TILE_M = 64


@dataclass(frozen=True)
class SearchSpace:
    """The configs a sweep tries: every combination of the fields that ``validate()`` accepts, pruned.

    Pruning (the defaults give about 300 bf16 and 360 fp8 configs; ``SearchSpace.full()`` turns it off):

    ``deepest_stages``: per tile shape, keep only the deepest N stage counts that fit in shared
    memory (2: the deepest and one fewer). A deeper pipeline hides more latency and costs nothing
    but shared memory, which is only worth leaving free for occupancy the kernel does not use
    (one CTA per SM). None keeps every stage count.
    ``min_stage_bytes``: drop tile shapes whose pipeline stages in flight on an SM (weights + x, times
    ``ctas_per_sm``) move fewer bytes than this; a tiny TMA transfer per barrier round-trip cannot
    keep HBM busy.
    ``include_defaults``: always add ``DEFAULT_CONFIGS`` of the family (the heuristic's choices: the sweep
    measures them anyway to report the gain over the default).
    ``prune_families``: a producer warp only for light CTAs (``ctas_per_sm`` > 1, one consumer
    warpgroup), where its registers buy occupancy; stream-K only for light CTAs with tile_m up to 16
    (decode), where tiles fill the grid in few waves; more than the default 2 fragment buffers only for tile_m
    of 64 and up on one CTA per SM with 2+ consumer warpgroups, no stream-K (where the WGMMAs are long enough for
    the decode to starve them); ping-pong only where two consumer warpgroups of one CTA per SM hold tiles of 64
    tokens and up (prefill, where the epilogue idles the tensor cores), no stream-K, a producer warpgroup, two
    fragment buffers.
    ``fragment_buffers``: the register buffers of decoded weights swept (``TileConfig.fragment_buffers``).
    ``activations``: the kernel family swept, "bf16" (W4A16) or "fp8" (W4A8: tile_k multiples of 128 only,
    which validate() keeps); a sweep tunes one family, and the table keeps the families apart (table_key).
    ``mma_rows_splits``: tile_m / mma_rows of the narrow-WGMMA variants added beside each config
    (``TileConfig.mma_rows``; 1 is the config itself, the only one by default): (1, 2, 4) also tries every tile
    with WGMMAs half and a quarter as wide where its rows are few, for skewed routing (``tune --narrow-wgmmas``).
    """

    tile_n: tuple[int, ...] = _SWEEP_TILE_N
    tile_m: tuple[int, ...] = _SWEEP_TILE_M
    tile_k: tuple[int, ...] = _SWEEP_TILE_K
    stages: tuple[int, ...] = tuple(range(MIN_STAGES, _SWEEP_MAX_STAGES + 1))
    warpgroups: tuple[int, ...] = _SWEEP_WARPGROUPS
    ctas_per_sm: tuple[int, ...] = _SWEEP_CTAS_PER_SM
    producers: tuple[str, ...] = PRODUCERS
    stream_k: tuple[bool, ...] = (False, True)
    deepest_stages: int | None = 2
    min_stage_bytes: int = 16 * 1024
    include_defaults: bool = True
    prune_families: bool = True
    activations: str = "bf16"
    fragment_buffers: tuple[int, ...] = FRAGMENT_BUFFER_CHOICES
    pingpong: tuple[bool, ...] = (False, True)
    mma_rows_splits: tuple[int, ...] = (1,)

    @classmethod
    def full(cls) -> "SearchSpace":
        """Every valid combination, no pruning (about 6400 configs)."""
        return cls(ctas_per_sm=CTAS_PER_SM_CHOICES, deepest_stages=None, min_stage_bytes=0, prune_families=False)

    @classmethod
    def quick(cls) -> "SearchSpace":
        """A small space for a fast sweep: tile_n 128 / 256, 1, 2 or 4 consumer warpgroups, 1 or 3 CTAs per SM,
        the deepest stages."""
        return cls(tile_n=(64, 128, 256), tile_k=(128, 256), warpgroups=(1, 2, 4), ctas_per_sm=(1, 3, 4, 5),
                   deepest_stages=1)


def with_narrow_wgmmas(space: SearchSpace) -> SearchSpace:
    """``space`` with the narrow-WGMMA variants (tile_m / mma_rows 2 and 4) and two CTAs per SM, where a decode tile
    of 64 rows and 128 weight rows fits its accumulators (three CTAs' registers do not hold them)."""
    return dataclasses.replace(space, mma_rows_splits=(1, 2, 4), ctas_per_sm=tuple(sorted({*space.ctas_per_sm, 2})))


def _valid(config: TileConfig) -> bool:
    try:
        config.validate()
    except ValueError:
        return False
    return True


def _family_worth_trying(tile_m: int, warpgroups: int, ctas: int, producer: str, stream_k: bool,
                         fragment_buffers: int = DEFAULT_FRAGMENT_BUFFERS, pingpong: bool = False) -> bool:
    """SearchSpace's family pruning (see its docstring)."""
    if pingpong and (tile_m < _DEEP_FRAGMENTS_MIN_TILE_M or ctas > 1 or producer == "warp"
                     or fragment_buffers != DEFAULT_FRAGMENT_BUFFERS):
        return False
    light = ctas > 1 and warpgroups == 1
    if producer == "warp" and not light:
        return False
    if fragment_buffers != DEFAULT_FRAGMENT_BUFFERS and (
        tile_m < _DEEP_FRAGMENTS_MIN_TILE_M or ctas > 1 or warpgroups < 2 or stream_k
    ):
        return False
    return not stream_k or (light and tile_m <= _STREAM_K_MAX_TILE_M)


def enumerate_configs(space: SearchSpace | None = None) -> list[TileConfig]:
    """The valid configs of ``space`` (default: ``SearchSpace()``), unique, ordered by tile_m then size."""
    space = space or SearchSpace()
    found: dict[str, TileConfig] = {}
    for tile_n, tile_m, tile_k, warpgroups, ctas, producer, stream_k, buffers, pingpong in itertools.product(
        space.tile_n, space.tile_m, space.tile_k, space.warpgroups, space.ctas_per_sm, space.producers, space.stream_k,
        space.fragment_buffers, space.pingpong,
    ):
        if space.prune_families and not _family_worth_trying(tile_m, warpgroups, ctas, producer, stream_k, buffers,
                                                             pingpong):
            continue
        fitting = [
            config
            for stages in sorted(set(space.stages))
            if _valid(config := TileConfig(tile_n, tile_m, tile_k, stages, warpgroups, ctas, producer=producer,
                                           stream_k=stream_k, activations=space.activations,
                                           fragment_buffers=buffers, pingpong=pingpong))
        ]
        if not fitting:
            continue
        if (fitting[0].x_stage_bytes + fitting[0].w_stage_bytes) * ctas < space.min_stage_bytes:
            continue
        if space.deepest_stages is not None:
            fitting = fitting[-space.deepest_stages :]
        for config in fitting:
            for variant in _narrow_wgmma_variants(config, space.mma_rows_splits):
                found[variant.name] = variant
    if space.include_defaults:
        for config in DEFAULT_CONFIGS:
            if config.activations == space.activations:
                found.setdefault(config.name, config)
    return sorted(found.values(), key=lambda c: (c.tile_m, c.tile_n, c.tile_k, c.warpgroups, c.ctas_per_sm,
                                                 c.producer, c.stream_k, c.fragment_buffers, c.pingpong, c.mma_rows,
                                                 c.stages))


def _narrow_wgmma_variants(config: TileConfig, splits: Sequence[int]) -> list[TileConfig]:
    """``config`` with each split of its tile_m into narrow WGMMAs that validate() accepts (split 1: itself)."""
    variants = []
    for split in splits:
        if split == 1:
            variants.append(config)
        elif config.tile_m % split == 0:
            variant = dataclasses.replace(config, mma_rows=config.tile_m // split)
            if _valid(variant):
                variants.append(variant)
    return variants


def tile_m_window(tokens_per_expert: int, routings: Sequence[str] = ("uniform",)) -> tuple[int, int]:
    """The tile_m range worth trying at ``tokens_per_expert`` (used to prune a sweep per M).

    Upper: ``max(16, 2 x bucket)``: a tile much taller than an expert's rows only multiplies idle
    WGMMA columns. Lower: ``bucket / 4`` clamped to 8..64: a short tile re-reads the weights for
    every tile_m rows, which at large M costs more than any latency it hides. With "zipf" among
    ``routings`` the upper edge is that of 2M: Zipf's hottest expert gets 8-30x M rows
    (``codegen.tune.loads``), so one more power of two upward is tried for it.
    """
    bucket = m_bucket(tokens_per_expert)
    reach = 4 if "zipf" in routings else 2
    return min(64, max(8, bucket // 4)), max(16, reach * bucket)


def configs_for_m(configs: Sequence[TileConfig], tokens_per_expert: int,
                  routings: Sequence[str] = ("uniform",)) -> list[TileConfig]:
    """The configs whose tile_m is in :func:`tile_m_window`; if none is, those of the nearest tile_m."""
    low, high = tile_m_window(tokens_per_expert, routings)
    kept = [c for c in configs if low <= c.tile_m <= high]
    if kept or not configs:
        return kept
    nearest = min({c.tile_m for c in configs}, key=lambda t: min(abs(t - low), abs(t - high)))
    return [c for c in configs if c.tile_m == nearest]


def m_filter_for(routings: Sequence[str]) -> Callable[[Sequence[TileConfig], int], list[TileConfig]]:
    """The sweep's per-M filter for ``routings``: :func:`configs_for_m` with their window."""
    if tuple(routings) == ("uniform",):
        return configs_for_m
    return functools.partial(configs_for_m, routings=tuple(routings))
