"""The line stores' staging (templates/mxfp4_line_stores.cuh, mxfp4_grouped_mm_sm90.cuh: store_columns_lines and the
candidate store_swiglu_lines), on the CPU: a consumer warpgroup's 128 threads modelled as the kernel indexes them. Every
staged 4-byte word is written exactly once and read back exactly once by the 16-byte loads, and neither the writes (one
warp at a time) nor the reads (one 8-lane phase at a time) hit a shared-memory bank twice. The GPU test (tests/test_store_paths_gpu.py) checks the
kernels' output bits."""

from __future__ import annotations

from collections import Counter

import pytest

from codegen.build.config import LINE_STAGE_PITCH as PITCH
from codegen.build.config import LINE_STAGE_ROWS as ROWS

THREADS = 128


def _thread(tid: int) -> tuple[int, int, int, int]:
    """(warp, g, t, odd) of a consumer thread: lanes 4 g + t, odd = the parity of its weight row (g)."""
    lane = tid & 31
    g, t = lane >> 2, lane & 3
    return tid >> 5, g, t, g & 1


def _store_writes(tid: int) -> list[int]:
    """Byte offsets of the Store/ScaleScatter words a thread stages for one 32-row block (j = 0..3, h = 0, 1)."""
    warp, g, t, odd = _thread(tid)
    base = (2 * t + odd) * PITCH + 2 * (16 * warp + g - odd)
    return [base + 8 * j * PITCH + 16 * h for j in range(4) for h in range(2)]


def _swiglu_writes(tid: int) -> list[int]:
    warp, g, t, odd = _thread(tid)
    base = (2 * t + odd) * PITCH + 2 * (8 * warp + g - odd)
    return [base + 8 * j * PITCH for j in range(4)]


def _store_reads(tid: int) -> list[int]:
    """16-byte loads of store_staged_rows: rows 16 k + tid / 8, piece tid % 8."""
    return [(16 * k + (tid >> 3)) * PITCH + 16 * (tid & 7) for k in range(2)]


def _swiglu_reads(tid: int) -> list[int]:
    """store_staged_half_rows: the 8 lanes of a phase read rows r and r + 4, 4 pieces each."""
    phase = tid >> 3
    row = (phase & 3) + 8 * (phase >> 2) + 4 * ((tid >> 2) & 1)
    return [row * PITCH + 16 * (tid & 3)]


LAYOUTS = {  # name: (writes, reads, bytes of a staged row)
    "store": (_store_writes, _store_reads, 128),
    "swiglu": (_swiglu_writes, _swiglu_reads, 64),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_staged_word_is_written_once_and_read_back_once(layout: str) -> None:
    writes, reads, row_bytes = LAYOUTS[layout]
    expected = {row * PITCH + column for row in range(ROWS) for column in range(0, row_bytes, 4)}
    written = Counter(offset for tid in range(THREADS) for offset in writes(tid))
    assert set(written) == expected and set(written.values()) == {1}
    read = Counter(offset + word for tid in range(THREADS) for offset in reads(tid) for word in range(0, 16, 4))
    assert set(read) == expected and set(read.values()) == {1}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_writes_and_reads_are_free_of_bank_conflicts(layout: str) -> None:
    writes, reads = LAYOUTS[layout][:2]
    for warp in range(THREADS // 32):  # a 4-byte store instruction: one warp, one word each
        lanes = range(32 * warp, 32 * warp + 32)
        for k in range(len(writes(0))):
            banks = [writes(tid)[k] // 4 % 32 for tid in lanes]
            assert len(set(banks)) == 32, (warp, k, sorted(banks))
    for phase in range(THREADS // 8):  # a 16-byte load: 8 lanes per phase, 4 banks each
        lanes = range(8 * phase, 8 * phase + 8)
        for k in range(len(reads(0))):
            banks = [(reads(tid)[k] // 4 + word) % 32 for tid in lanes for word in range(4)]
            assert len(set(banks)) == 32, (phase, k, sorted(banks))


def test_rows_one_apart_would_conflict() -> None:
    """Why the SwiGLU read pairs rows r and r + 4: rows r and r + 1 (144 bytes apart) share 12 banks."""
    first = {(PITCH * 0 // 4 + word) % 32 for word in range(16)}
    next_row = {(PITCH * 1 // 4 + word) % 32 for word in range(16)}
    fourth = {(PITCH * 4 // 4 + word) % 32 for word in range(16)}
    assert len(first & next_row) == 12 and not first & fourth
