"""codegen.runtime.schedule: the host's restatement of the device scheduler (templates/mxfp4_scheduler.cuh), which
`bench waits` reads for its balance line. Checked against the stream-K model of tests/test_stream_k_model.py, against
tile-by-tile's stride, and on small problems worked by hand."""

from __future__ import annotations

import itertools
import random

import pytest

from codegen.build.config import TileConfig
from codegen.runtime.schedule import balance, cta_loads, work_units
from mxfp4.format.layout import ATOM_K, ATOM_N
from test_stream_k_model import PROBLEMS
from test_stream_k_model import work_units as model_work_units

DECODE = TileConfig.from_name("n128_m8_k128_s6_wg1_c3")  # 2 atoms of N, 2 of K per stage
STREAM_K = TileConfig.from_name("n128_m8_k128_s6_wg1_c3_pw_sk")


@pytest.mark.parametrize("tiles, k_tiles, grid", PROBLEMS)
def test_stream_k_units_are_the_models(tiles: int, k_tiles: int, grid: int) -> None:
    for cta in range(grid):
        assert list(work_units(True, cta, grid, tiles, k_tiles)) == model_work_units(cta, grid, tiles, k_tiles)


@pytest.mark.parametrize("tiles, grid", list(itertools.product((1, 7, 736, 1440), (1, 5, 132, 396))))
def test_tile_by_tile_strides_over_the_grid(tiles: int, grid: int) -> None:
    seen = []
    for cta in range(grid):
        units = list(work_units(False, cta, grid, tiles, 23))
        assert [tile for tile, _, _ in units] == list(range(cta, tiles, grid))
        assert all((k_begin, k_end) == (0, 23) for _, k_begin, k_end in units)
        seen += [tile for tile, _, _ in units]
    assert sorted(seen) == list(range(tiles))


def test_balance_by_hand_tile_by_tile() -> None:
    # Experts of 1, 0 and 9 rows: 1 + 0 + 2 m-tiles of 8; N = 192 is 2 n-tiles, the second one atom of 64 rows.
    # 6 tiles over 4 CTAs: CTA 0 gets tiles 0 and 4 (2 atoms each), CTA 1 tiles 1 and 5 (1 each), CTA 2 tile 2 (2),
    # CTA 3 tile 3 (1): atoms 4, 2, 2, 1 (x 45 k-atoms each).
    got = balance(DECODE, [1, 0, 9], 192, 2880, 4)
    assert (got.tiles, got.ctas, got.max_tiles) == (6, 4, 2)
    assert got.tile_efficiency == pytest.approx(6 / 8) and got.atom_efficiency == pytest.approx(9 / 16)


def test_balance_by_hand_stream_k_counts_the_k_tail() -> None:
    # One tile of 2 atoms of N; K = 320 is 5 atoms: k-steps of 2, 2 and 1 atoms. Two CTAs: steps [0, 2) and [2, 3).
    got = balance(STREAM_K, [1], 128, 320, 2)
    assert (got.tiles, got.max_tiles) == (1, 1) and got.tile_efficiency == 1.0
    assert got.atom_efficiency == pytest.approx((8 + 2) / (2 * 8))


def test_balance_of_gpt_oss_20b_decode_on_an_h100_grid() -> None:
    # gate_up at M = 1: 32 experts x 45 n-tiles = 1440 tiles over 132 x 3 CTAs: 252 CTAs get 4, the rest 3.
    gate_up = balance(DECODE, [1] * 32, 5760, 2880, 396)
    assert (gate_up.tiles, gate_up.max_tiles) == (1440, 4)
    assert gate_up.tile_efficiency == pytest.approx(1440 / (396 * 4)) == gate_up.atom_efficiency
    # down: 23 n-tiles, the last of one atom: 736 tiles, at most two full ones (4 atoms of N) per CTA.
    down = balance(DECODE, [1] * 32, 2880, 2880, 396)
    assert (down.tiles, down.max_tiles) == (736, 2)
    assert down.tile_efficiency == pytest.approx(736 / (396 * 2))
    assert down.atom_efficiency == pytest.approx(32 * 45 * 45 / (396 * 4 * 45))


@pytest.mark.parametrize("config", [DECODE, STREAM_K], ids=lambda config: config.name)
def test_cta_loads_neither_lose_nor_invent_work(config: TileConfig) -> None:
    """Over random routings and shapes, the CTAs' atoms add up to every m-tile's whole weight matrix, and tile by tile
    their tiles to the problem's tiles."""
    rng = random.Random(21)
    for _ in range(60):
        rows = [rng.choice((0, 1, 3, 8, 17)) for _ in range(rng.randint(1, 6))]
        n, k, grid = rng.randint(1, 400), 32 * rng.randint(1, 40), rng.randint(1, 50)
        loads = cta_loads(config, rows, n, k, grid)
        m_tiles = sum(-(-r // config.tile_m) for r in rows)
        assert len(loads) == grid
        assert sum(atoms for _, atoms in loads) == m_tiles * -(-n // ATOM_N) * -(-k // ATOM_K), (rows, n, k, grid)
        tiles = m_tiles * -(-n // config.tile_n)
        if not config.stream_k:
            assert sum(count for count, _ in loads) == tiles
        got = balance(config, rows, n, k, grid)
        assert got.tiles == tiles and 0.0 < got.tile_efficiency <= 1.0 and 0.0 < got.atom_efficiency <= 1.0
