"""The persistent grid's walk over the work, restated on the host from templates/mxfp4_scheduler.cuh.

The device numbers the tiles (expert, m-tile, n-tile) with the n-tile fastest and hands them out by WorkCursor: tile
by tile, CTA b takes tiles b, b + G, b + 2G, ... (G CTAs); with stream-K the tiles x k-steps, tile-major, are cut
into G ranges that differ by at most one k-step (StreamKSplit). The launch needs none of this (it only sizes the grid,
:func:`codegen.runtime.launch.grid_size`); `bench waits` reads it to say how evenly the CTAs share the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from codegen.build.config import TileConfig
from mxfp4.format.layout import ATOM_K, ATOM_N


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def work_units(stream_k: bool, cta: int, grid: int, tiles: int, k_tiles: int) -> Iterator[tuple[int, int, int]]:
    """WorkCursor: the (tile, k_begin, k_end) units of CTA ``cta`` of ``grid``, in the order it does them."""
    if not stream_k:
        for tile in range(cta, tiles, grid):
            yield tile, 0, k_tiles
        return
    steps = tiles * k_tiles
    per_cta, extra = steps // grid, steps % grid  # StreamKSplit

    def begin(b: int) -> int:
        return b * per_cta + min(b, extra)

    step, end = begin(cta), begin(cta + 1)
    while step < end:
        tile = step // k_tiles
        k_begin = step - tile * k_tiles
        k_end = min(k_tiles, k_begin + (end - step))
        yield tile, k_begin, k_end
        step += k_end - k_begin


@dataclass(frozen=True)
class Balance:
    """How evenly a launch's CTAs share the work: tiles (stream-K: tiles they work on, whole or part) and the weight
    atoms they load (the bytes that bound a decode-sized launch)."""

    tiles: int
    ctas: int
    max_tiles: int  # the most tiles one CTA works on
    tile_efficiency: float  # mean over max of the tiles per CTA: 1.0 when every CTA does as many
    atom_efficiency: float  # the same for the weight atoms a CTA loads


def cta_loads(config: TileConfig, rows_per_expert: Sequence[int], n: int, k: int, grid: int) -> list[tuple[int, int]]:
    """Per CTA of ``grid``: (tiles it works on, weight atoms it loads) for the grouped GEMM ``[rows of e] x [n, k]``
    per expert e, as templates/mxfp4_scheduler.cuh assigns the work (the n tail's tile holds fewer atoms, the k tail's
    step too; with stream-K a tile cut between CTAs counts for each)."""
    n_tiles = _cdiv(n, config.tile_n)
    tiles = sum(_cdiv(rows, config.tile_m) for rows in rows_per_expert) * n_tiles
    n_atoms, k_atoms = _cdiv(n, ATOM_N), _cdiv(k, ATOM_K)
    atoms_n, step_atoms = config.tile_n // ATOM_N, config.k_atoms_per_stage
    k_tiles = config.k_steps(k_atoms)
    loads = []
    for cta in range(grid):
        units = list(work_units(config.stream_k, cta, grid, tiles, k_tiles))
        loads.append((len(units), sum(min(atoms_n, n_atoms - (tile % n_tiles) * atoms_n)
                                      * (min(k_atoms, k_end * step_atoms) - k_begin * step_atoms)
                                      for tile, k_begin, k_end in units)))
    return loads


def balance(config: TileConfig, rows_per_expert: Sequence[int], n: int, k: int, grid: int) -> Balance:
    """How evenly :func:`cta_loads` spreads the problem over ``grid`` CTAs."""
    loads = cta_loads(config, rows_per_expert, n, k, grid)
    tiles = sum(_cdiv(rows, config.tile_m) for rows in rows_per_expert) * _cdiv(n, config.tile_n)
    tile_counts, atom_counts = [t for t, _ in loads], [a for _, a in loads]
    return Balance(tiles, grid, max(tile_counts, default=0), _mean_over_max(tile_counts), _mean_over_max(atom_counts))


def _mean_over_max(values: list[int]) -> float:
    most = max(values, default=0)
    return sum(values) / (len(values) * most) if most else 1.0
