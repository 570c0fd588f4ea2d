"""A model of the stream-K split (templates/mxfp4_scheduler.cuh StreamKSplit + WorkCursor, and
templates/mxfp4_stream_k.cuh's slots), run on the CPU over many problem sizes.

The device code is integer arithmetic that decides which CTA does which k-steps, where a cut tile's
shares are stored and which CTAs the finishing one reads back. This model restates those formulas
line for line and checks what the fix-up relies on: every k-step is done once, a CTA cuts at most two
tiles and they get different slots, no two shares of the whole launch share a slot, and the CTAs
between owner(first step) and owner(last step) of a tile are exactly the ones that did its shares.
The GPU tests run the kernels themselves against float64 (tests/test_gpu_kernel.py).
"""

from __future__ import annotations

import itertools

import pytest


class StreamKSplit:
    def __init__(self, steps: int, grid: int) -> None:
        self.per_cta, self.extra = steps // grid, steps % grid

    def begin(self, cta: int) -> int:
        return cta * self.per_cta + min(cta, self.extra)

    def owner(self, step: int) -> int:
        long_ranges = self.extra * (self.per_cta + 1)
        if step < long_ranges:
            return step // (self.per_cta + 1)
        return self.extra + (step - long_ranges) // self.per_cta


def work_units(cta: int, grid: int, tiles: int, k_tiles: int) -> list[tuple[int, int, int]]:
    """WorkCursor<true>: the (tile, k_begin, k_end) units of CTA ``cta``, in order."""
    split = StreamKSplit(tiles * k_tiles, grid)
    step, end, units = split.begin(cta), split.begin(cta + 1), []
    while step < end:
        tile = step // k_tiles
        k_begin = step - tile * k_tiles
        k_end = min(k_tiles, k_begin + (end - step))
        units.append((tile, k_begin, k_end))
        step += k_end - k_begin
    return units


def slot(split: StreamKSplit, cta: int, tile_begin: int) -> int:
    return 2 * cta + (0 if split.begin(cta) >= tile_begin else 1)


PROBLEMS = [
    (tiles, k_tiles, grid)
    for tiles, k_tiles, grid in itertools.product((1, 2, 7, 36, 1440), (1, 2, 3, 23), (1, 5, 132, 396, 660))
]


@pytest.mark.parametrize("tiles, k_tiles, grid", PROBLEMS)
def test_split_covers_every_step_once_and_the_fixup_finds_every_share(tiles: int, k_tiles: int, grid: int) -> None:
    split = StreamKSplit(tiles * k_tiles, grid)
    done = [[0] * k_tiles for _ in range(tiles)]
    shares: dict[int, list[int]] = {}  # tile -> CTAs that did a cut share of it, in order
    used_slots: set[int] = set()
    for cta in range(grid):
        cut = 0
        for tile, k_begin, k_end in work_units(cta, grid, tiles, k_tiles):
            assert 0 <= k_begin < k_end <= k_tiles
            for k in range(k_begin, k_end):
                done[tile][k] += 1
                assert split.owner(tile * k_tiles + k) == cta
            if (k_begin, k_end) != (0, k_tiles):
                cut += 1
                shares.setdefault(tile, []).append(cta)
                s = slot(split, cta, tile * k_tiles)
                assert s not in used_slots and s // 2 == cta
                used_slots.add(s)
        assert cut <= 2
    assert all(count == 1 for row in done for count in row)
    for tile, ctas in shares.items():
        first, last = split.owner(tile * k_tiles), split.owner(tile * k_tiles + k_tiles - 1)
        assert ctas == list(range(first, last + 1))


def test_split_is_even() -> None:
    split = StreamKSplit(1440 * 23, 660)
    sizes = {split.begin(b + 1) - split.begin(b) for b in range(660)}
    assert sizes == {1440 * 23 // 660, 1440 * 23 // 660 + 1}
