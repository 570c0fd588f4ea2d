// Candidate epilogue stores, not shipped: compiled in with -DMXFP4_LINE_STORES (`bench ncu-case --prefill --configs
// ... --mma-roof` times it as "line stores (candidate)"; tests/test_candidate_stores_gpu.py checks it bit for bit
// against the shipped build). The Store and ScaleScatter epilogues write the same values to the same places as the paired
// stores, but through shared memory: a consumer warpgroup stages 32 rows of its 64-column block at a time (the paired
// words, one 4-byte write each), then every 8 lanes read one staged row back and store it as one whole 128-byte line
// (16 bytes per lane), as mxfp4_coalesced_stores.cuh's roof does with the values in the wrong places. The other
// candidate, mxfp4_sector_stores.cuh, needs no shared memory but fills only a sector per row and store.
// The bulk stores (-DMXFP4_BULK_STORES, "bulk stores (candidate)") stage the same rows the same way, then hand them
// to the TMA unit: one lane per staged row issues an asynchronous bulk copy (shared -> global) of the row's bytes,
// so the warpgroup goes on while the TMA unit writes; it waits only before it rewrites the staging area, for the
// copies to have read it. What the line stores leave with the warps (the global writes, the tile's 64 KB at once as
// every CTA ends its tile together) goes to the TMA unit, under the next tile's WGMMAs.
// The staging area (kLineStageBytes per consumer warpgroup) sits before the ring in these two builds only; the
// launch reserves it (codegen/runtime/launch.py: LINE_STAGE_BYTES, the same figure).
#pragma once

#include <cuda/std/cstdint>
#include <cute/arch/copy_sm90_tma.hpp>

namespace mxfp4 {

__device__ __forceinline__ constexpr bool line_stores_build() {
#ifdef MXFP4_LINE_STORES
  return true;
#else
  return false;
#endif
}

__device__ __forceinline__ constexpr bool bulk_stores_build() {
#ifdef MXFP4_BULK_STORES
  return true;
#else
  return false;
#endif
}

// Either build that stages rows in shared memory, and so lays out (and has the launch reserve) the staging areas.
__device__ __forceinline__ constexpr bool row_stage_build() { return line_stores_build() || bulk_stores_build(); }

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

// The bulk stores' issuing warp (the warpgroup's first): rows m0 .. m0 + 31 of the staged block, lane = row, each
// valid row's columns col0 .. min(col0 + 64, n) - 1 as one bulk copy to out row `out_row(lane)`; the lane's copy is
// committed as its bulk group. The caller has fenced the staging writes for the async proxy (cute::tma_store_fence)
// and synchronized the warpgroup. 16-byte sizes and addresses: sixteen_byte_stores_fit.
template <class Params, class OutRow>
__device__ __forceinline__ void bulk_store_staged_rows(Params const& p, uint8_t const* stage, int m0, int m_limit,
                                                       int col0, int lane, OutRow const& out_row) {
  int const out = out_row(lane);  // every lane calls it (a shuffle for the scatter)
  int const bytes = 2 * min(64, p.n - col0);
  if (m0 + lane < m_limit && bytes > 0)
    cute::SM90_BULK_COPY_S2G::copy(stage + lane * kLineStagePitch, p.out + static_cast<size_t>(out) * p.out_cols + col0,
                                   bytes);
  cute::tma_store_arrive();  // cp.async.bulk.commit_group: this lane's copy (or none) as one group
}

// The issuing lanes' copies have read the staging area: it may be rewritten (after a warpgroup sync).
__device__ __forceinline__ void bulk_rows_read() { cute::tma_store_wait<0>(); }

// The issuing lanes' copies are complete, their writes done: before the consumer exits (the staging area is the
// CTA's shared memory, which must outlive the copies that read it).
__device__ __forceinline__ void bulk_rows_written() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

}  // namespace mxfp4
