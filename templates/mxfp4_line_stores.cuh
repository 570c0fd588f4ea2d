// Candidate epilogue stores, not shipped: compiled in with -DMXFP4_LINE_STORES (`bench ncu-case --prefill --configs
// ... --mma-roof` times it as "line stores (candidate)"; tests/test_candidate_stores_gpu.py checks it bit for bit
// against the shipped build). The Store and ScaleScatter epilogues write the same values to the same places as the paired
// stores, but through shared memory: a consumer warpgroup stages 32 rows of its 64-column block at a time (the paired
// words, one 4-byte write each), then every 8 lanes read one staged row back and store it as one whole 128-byte line
// (16 bytes per lane), as mxfp4_coalesced_stores.cuh's roof does with the values in the wrong places. The other
// candidate, mxfp4_sector_stores.cuh, needs no shared memory but fills only a sector per row and store.
// The staging area (kLineStageBytes per consumer warpgroup) sits before the ring in this build only; the launch
// reserves it (codegen/runtime/launch.py: LINE_STAGE_BYTES, the same figure).
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

__device__ __forceinline__ constexpr bool line_stores_build() {
#ifdef MXFP4_LINE_STORES
  return true;
#else
  return false;
#endif
}

constexpr int kLineStageRows = 32;    // rows of a warpgroup's 64-column block staged at once
constexpr int kLineStagePitch = 144;  // bytes per staged row: 128 of values, 16 of pad (no bank conflicts, below)
constexpr int kLineStageBytes = kLineStageRows * kLineStagePitch;  // per consumer warpgroup

// The staging areas of a CTA's consumer warpgroups, before the ring, 1024-byte aligned (the ring's TMA boxes need it).
template <int Warpgroups>
__device__ __forceinline__ constexpr int line_stage_reserved() {
  constexpr int reserved = (Warpgroups * kLineStageBytes + 1023) / 1024 * 1024;
#ifdef MXFP4_LINE_STAGE_RESERVED
  static_assert(reserved == MXFP4_LINE_STAGE_RESERVED, "codegen/runtime/launch.py reserves another size");
#endif
  return reserved;
}

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
