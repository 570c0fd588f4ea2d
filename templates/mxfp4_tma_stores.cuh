// Candidate, not shipped: TMA tensor stores (-DMXFP4_TMA_STORES; `--mma-roof` times it as "tma stores (candidate)",
// tests/test_store_paths_gpu.py checks its bits against the shipped stores). The Store epilogue of a config whose store
// path is the line stores: a consumer warpgroup stages 32 rows of its 64-column block as the line stores do, but
// densely, 128-byte swizzled (the layout TMA's SWIZZLE_128B reads), and one lane hands the block to the TMA unit as
// one tensor store (`cp.async.bulk.tensor.2d`, SASS UTMASTG) through a map of out (the `out_map` parameter, encoded
// per launch as x's). Two staging buffers per warpgroup: the lane waits for block b - 1's read before the warpgroup's
// barrier of block b, so a buffer is restaged only after its previous store has read it and no thread waits on a
// store in flight.
// Why: after the line stores, W4A8 gate_up M = 4096 still spends 13 % of its time in the epilogue (NOTES, ninth
// session: 3.148 against 2.740 ms without it) while both warpgroups write and the tensor pipe idles; the bulk copies
// that tried to take the writes off the warps lost 11-23 % to 256 TMA operations per warpgroup and tile and a wait
// before every restaging. Here a tile is 8 operations per warpgroup (tile_m 256), and the wait is one block behind.
// Rows a store may not write (past the tile's valid rows: the next expert's) are never in a stored block: a block
// with fewer valid rows goes out through the line stores' 16-byte stores from the same buffer; columns past N are
// clipped by the map.
#pragma once

#include <cuda/std/cstdint>

#include <cute/arch/copy_sm90_tma.hpp>

namespace mxfp4 {

__device__ __forceinline__ constexpr bool tma_stores_build() {
#ifdef MXFP4_TMA_STORES
  return true;
#else
  return false;
#endif
}

// kTmaStageRows (rows of a block: the map's box height) and kTmaStageBuffers (per consumer warpgroup): rendered from
// codegen/build/config.py, which sizes the launch's reservation from them.
constexpr int kTmaStageBlockBytes = kTmaStageRows * 128;                // 64 bf16 per row, no pad (swizzled instead)
constexpr int kTmaStageBytes = kTmaStageBuffers * kTmaStageBlockBytes;  // per consumer warpgroup, 1024-byte aligned
static_assert(kTmaStageBlockBytes % 1024 == 0, "a 128-byte swizzled block starts 1024-byte aligned");

// Byte offset in a staged block of the 4-byte word at row `row`, byte `byte` (0..127) of the row: 16-byte chunk c of
// row r sits at chunk c ^ (r mod 8), TMA's 128-byte swizzle (the block starts 1024-byte aligned).
__device__ __forceinline__ int swizzled_offset(int row, int byte) {
  return row * 128 + ((((byte >> 4) ^ row) & 7) << 4) + (byte & 15);
}

// The staged block at `block` to out rows row .. row + 31, columns col .. col + 63, by this (one) thread.
template <class Params>
__device__ __forceinline__ void tma_store_block(Params const& p, uint8_t const* block, int col, int row) {
  cute::SM90_TMA_STORE_2D::copy(&p.out_map, block, col, row);
  cute::tma_store_arrive();  // one bulk group per block
}

// The lane that issued the stores: every store so far has read its buffer.
__device__ __forceinline__ void tma_stores_read_all() { cute::tma_store_wait<0>(); }

// Before the kernel exits (the staging areas go with the CTA): every store complete.
__device__ __forceinline__ void tma_stores_drain() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// A block with fewer than 32 valid rows (m0 + row < m_limit): the valid rows from its buffer to out rows row0 + m0 +
// row with the line stores' 16-byte stores (mxfp4_line_stores.cuh), the swizzle undone.
template <class Params>
__device__ __forceinline__ void store_swizzled_rows(Params const& p, uint8_t const* block, int m0, int m_limit,
                                                    int row0, int col0, int tid) {
  auto const staged = [block](int row, int piece) { return block + swizzled_offset(row, 16 * piece); };
  store_block_lines(p, staged, m0, m_limit, col0, tid, [&](int row) { return row0 + m0 + row; });
}

}  // namespace mxfp4
