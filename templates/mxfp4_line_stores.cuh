// Line stores (StoreMode::Lines, TileConfig.store_path: the Store and ScaleScatter epilogues of tiles 128 rows tall or
// more, where the staging area fits). They write the same values to the same places as the paired stores, but through
// shared memory: a consumer warpgroup stages 32 rows of its 64-column block at a time (the paired words, one 4-byte
// write each), then every 8 lanes read one staged row back and store it as one whole 128-byte line (16 bytes per
// lane). Why: whole lines are what the memory system wants (NOTES, ninth session, gpt-oss-20b gate_up M = 4096 under
// Nsight: W4A8 3.540 -> 3.148 ms, W4A16 5.626 -> 5.332 ms, within 1-3 % of the coalesced-stores roof; the sector stores
// took 3.232 / 5.487, a bulk copy per staged row from the TMA unit 4.086 / 6.283).
// The staging areas (kLineStageBytes per consumer warpgroup) sit before the ring; TileConfig.line_stage_bytes
// reserves them (rendered as the config's LineStageBytes) and counts them in the config's shared memory.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

// kLineStageRows (rows of a warpgroup's 64-column block staged at once) and kLineStagePitch (bytes per staged row: 128
// of values, 16 of pad, so that no write or read-back below hits a bank twice): rendered from codegen/build/config.py.
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

// Candidate, not shipped: the SwiGLU epilogue's line stores (-DMXFP4_SWIGLU_LINES; `--mma-roof` times it as "swiglu
// line stores (candidate)", tests/test_store_paths_gpu.py checks its bits against the paired stores). A warpgroup's
// 64 weight rows are 32 output channels, 64 bytes of a row: staged the same way (the same pitch), each staged row is
// stored as one 64-byte piece by 4 lanes; so a store request fills 16 whole sectors on 8 rows, where the paired
// stores half-fill 8 sectors on 8 rows. The launch reserves the staging areas (MXFP4_DIAGNOSTIC_STAGE_BYTES).
__device__ __forceinline__ constexpr bool swiglu_lines_build() {
#ifdef MXFP4_SWIGLU_LINES
  return true;
#else
  return false;
#endif
}

// The staging areas a diagnostic build's launch reserves beyond the config's own (TileConfig.line_stage_bytes).
__device__ __forceinline__ constexpr int diagnostic_stage_bytes() {
#ifdef MXFP4_DIAGNOSTIC_STAGE_BYTES
  return MXFP4_DIAGNOSTIC_STAGE_BYTES;
#else
  return 0;
#endif
}

// Whether the SwiGLU line stores fit this launch (uniform): sixteen_byte_stores_fit's aligned rows, and whole
// 8-channel pieces (N a multiple of 16 weight rows).
template <class Params>
__device__ __forceinline__ bool swiglu_lines_fit(Params const& p) {
  return (p.n & 15) == 0 && sixteen_byte_stores_fit(p) && !swiglu_e4m3_output(p);  // bf16 rows only
}

// Rows m0 .. m0 + 31 of the warpgroup's 32-channel SwiGLU block from the staging area to out row row0 + row, channels
// channel0 .. channel0 + 31, within the valid rows and channels (N / 2 of them): 4 lanes per row, 16 bytes each. The 8
// lanes of one 16-byte shared-memory phase read rows r and r + 4: rows 1 apart (144 bytes) would share 12 banks, rows 4
// apart share none.
template <class Params>
__device__ __forceinline__ void store_staged_half_rows(Params const& p, uint8_t const* stage, int m0, int m_limit,
                                                       int row0, int channel0, int tid) {
  int const piece = tid & 3;
  int const phase = tid >> 3;
  int const row = (phase & 3) + 8 * (phase >> 2) + 4 * ((tid >> 2) & 1);
  int const channel = channel0 + 8 * piece;
  uint4 const value = *reinterpret_cast<uint4 const*>(stage + row * kLineStagePitch + 16 * piece);
  if (m0 + row < m_limit && channel + 8 <= p.n / 2)
    *reinterpret_cast<uint4*>(p.out + static_cast<size_t>(row0 + m0 + row) * p.out_cols + channel) = value;
}

}  // namespace mxfp4
