"""The sector stores' index math (templates/mxfp4_sector_stores.cuh), on the CPU: a warp of 32 lanes
simulated step by step (the word packing, the three shuffle stages of transpose_8x8_halves, the 16-byte stores), its
writes compared with where the WGMMA accumulator layout puts every value (what the shipped stores write). The GPU test
(tests/test_store_paths_gpu.py) checks the compiled kernel against the paired stores bit for bit."""

from __future__ import annotations

import random

import pytest

LANES = 32


def shfl_xor(values: list[int], mask: int) -> list[int]:
    return [values[lane ^ mask] for lane in range(LANES)]


def byte_perm(x: int, y: int, selector: int) -> int:
    source = x.to_bytes(4, "little") + y.to_bytes(4, "little")
    return int.from_bytes(bytes(source[(selector >> (4 * i)) & 0xF] for i in range(4)), "little")


def exchange_words(words: list[list[int]], lane_xor: int, low: int, high: int, bit: int) -> None:
    """exchange_words<LaneXor, Low, High>(w, g & bit) in every lane at once."""
    bit_set = [((lane >> 2) & bit) != 0 for lane in range(LANES)]
    send = [words[lane][low] if bit_set[lane] else words[lane][high] for lane in range(LANES)]
    recv = shfl_xor(send, lane_xor)
    for lane in range(LANES):
        words[lane][low if bit_set[lane] else high] = recv[lane]


def transpose_8x8_halves(words: list[list[int]], halves: bool = True) -> None:
    """The device function's three stages (``halves=False`` leaves the last one out, to show the check can fail)."""
    exchange_words(words, 16, 0, 2, 4)
    exchange_words(words, 16, 1, 3, 4)
    exchange_words(words, 8, 0, 1, 2)
    exchange_words(words, 8, 2, 3, 2)
    for k in range(4 if halves else 0):
        odd = [((lane >> 2) & 1) == 1 for lane in range(LANES)]
        send = [words[lane][k] if odd[lane] else words[lane][k] >> 16 for lane in range(LANES)]
        recv = shfl_xor(send, 4)
        for lane in range(LANES):
            words[lane][k] = byte_perm(words[lane][k], recv[lane], 0x3254 if odd[lane] else 0x5410)


def accumulator_place(lane: int, index: int) -> tuple[int, int]:
    """(tile row, column within the warp's 16-column slab) of accumulator ``index`` of ``lane`` (WGMMA's layout)."""
    g, t = lane >> 2, lane & 3
    i, r = divmod(index, 4)
    return 8 * i + 2 * t + (r & 1), g + 8 * (r >> 1)


def sector_store_writes(acc: list[list[int]], tile_m: int, halves: bool = True) -> dict[tuple[int, int], int]:
    """{(row, column): 16-bit value} that store_columns_sectors writes (Store kind, one atom, warp 0)."""
    writes: dict[tuple[int, int], int] = {}
    for pair in range(tile_m // 16):
        words = []
        for lane in range(LANES):
            lane_words = []
            for k in range(4):
                i, rr = 2 * pair + (k >> 1), k & 1
                low, high = acc[lane][4 * i + rr], acc[lane][4 * i + 2 + rr]  # columns g and g + 8
                lane_words.append(low | (high << 16))
            words.append(lane_words)
        transpose_8x8_halves(words, halves)
        for lane in range(LANES):
            g, t = lane >> 2, lane & 3
            ii, r, h = g >> 2, (g >> 1) & 1, g & 1
            row = 8 * (2 * pair + ii) + 2 * t + r
            for k, word in enumerate(words[lane]):  # uint4 {w0, w1, w2, w3}: columns 8 h + 2 k, + 1
                for half in range(2):
                    place = (row, 8 * h + 2 * k + half)
                    assert place not in writes, f"{place} written twice"
                    writes[place] = (word >> (16 * half)) & 0xFFFF
    return writes


@pytest.mark.parametrize("tile_m", [16, 32, 64, 256])
def test_the_transpose_puts_every_accumulator_where_the_layout_says(tile_m):
    accumulators = tile_m // 2
    ids = random.Random(tile_m).sample(range(1, 1 << 16), LANES * accumulators)  # distinct 16-bit values
    acc = [ids[lane * accumulators:(lane + 1) * accumulators] for lane in range(LANES)]
    expected = {accumulator_place(lane, index): acc[lane][index] for lane in range(LANES) for index in range(accumulators)}
    got = sector_store_writes(acc, tile_m)
    assert got == expected
    assert len(got) == tile_m * 16  # every (row, column) of the warp's slab exactly once


def test_a_stage_left_out_misplaces_values():
    """The check can fail: without the last stage (the halves), values land in the wrong columns."""
    acc = [[(lane << 8) | index for index in range(8)] for lane in range(LANES)]
    expected = {accumulator_place(lane, index): acc[lane][index] for lane in range(LANES) for index in range(8)}
    assert sector_store_writes(acc, 16) == expected
    assert sector_store_writes(acc, 16, halves=False) != expected
