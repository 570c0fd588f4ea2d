// Line stores (StoreMode::Lines, TileConfig.store_path: the Store and ScaleScatter epilogues of tiles 128 rows tall or
// more, where the staging area fits). They write the same values to the same places as the paired stores, but through
// shared memory: a consumer warpgroup stages 32 rows of its 64-column block at a time (the paired words, one 4-byte
// write each), then every 8 lanes read one staged row back and store it as one whole 128-byte line (16 bytes per
// lane). Why: whole lines are what the memory system wants (NOTES, ninth session, gpt-oss-20b gate_up M = 4096 under
// Nsight: W4A8 3.540 -> 3.148 ms, W4A16 5.626 -> 5.332 ms, within 2 % of the coalesced-stores roof; the sector stores
// took 3.232 / 5.487, a bulk copy per staged row from the TMA unit 4.086 / 6.283).
// The staging areas (kLineStageBytes per consumer warpgroup) sit before the ring; TileConfig.line_stage_bytes
// reserves them (rendered as the config's LineStageBytes) and counts them in the config's shared memory.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

constexpr int kLineStageRows = 32;    // rows of a warpgroup's 64-column block staged at once
constexpr int kLineStagePitch = 144;  // bytes per staged row: 128 of values, 16 of pad (no bank conflicts, below)
constexpr int kLineStageBytes = kLineStageRows * kLineStagePitch;  // per consumer warpgroup

// Rows m0 .. m0 + 31 of the warpgroup's 64-column block from the staging area to out, one 128-byte line per 8 lanes
// and staged row (two rows per lane): row `row` of the block goes to out row `out_row(row)` (Store: the tile's rows in
// order; ScaleScatter: the row's destination), columns col0 .. col0 + 63, within the valid rows and columns.
template <class Params, class OutRow>
__device__ __forceinline__ void store_staged_rows(Params const& p, uint8_t const* stage, int m0, int m_limit, int col0,
                                                  int tid, OutRow const& out_row) {
  int const piece = tid & 7;  // 16 bytes of a row
  int const column = col0 + 8 * piece;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    int const row = 16 * k + (tid >> 3);
    uint4 const value = *reinterpret_cast<uint4 const*>(stage + row * kLineStagePitch + 16 * piece);
    int const out = out_row(row);  // every lane calls it (a shuffle for the scatter)
    if (m0 + row < m_limit && column + 8 <= p.n)
      *reinterpret_cast<uint4*>(p.out + static_cast<size_t>(out) * p.out_cols + column) = value;
  }
}

}  // namespace mxfp4
