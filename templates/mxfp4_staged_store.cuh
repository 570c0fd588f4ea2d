// Staged stores (TileConfig.staged_stores, names `_ss`): a tile's outputs leave through shared memory, so that each
// lane writes 16 contiguous bytes of an output row instead of one bf16 value per store.
//
// Why: a consumer thread holds its accumulators transposed to the output (weight row n = 16 w + g and + 8, token
// m = 8 i + 2 t + r), so the direct epilogue (store_tile) writes one 2-byte value per accumulator, 8 lanes to a
// row: 128 stores per thread for a 64 x 256 block, while the tensor pipe idles (the consumer warpgroups of a CTA
// finish a tile together). Here a warp packs its values to bf16 pairs, which are the fragments of m8n8 matrices
// (n as rows, m as columns); stmatrix .trans writes each into shared memory transposed, one 16-byte row per token
// holding 8 output columns; each lane then reads back 16 bytes and stores them with one 16-byte store.
//
// Where: the unit's last ring slot, whose x bytes the WGMMAs are done with (consume waits for every consumer
// warpgroup's WGMMAs, holds the slot back until the tile is stored, then hands it to the producer), so staging
// costs no shared memory. Each consumer warp stages Cfg::StagedChunk tokens at a time (TileConfig.staged_chunk) in
// its own part of the slot, in token rows of Groups x 16 bytes (the Store and ScaleScatter epilogues: two groups of 8
// weight rows, g and g + 8; SwiGLU: one group of 8 channels). With two groups the 16-byte halves of a row swap every
// 4 tokens, so that the 8 rows of one stmatrix matrix fall in different banks.
//
// The values and the bounds are the direct epilogue's (mxfp4_epilogue.cuh): the same expressions, the same
// round-to-nearest conversion to bf16, a store only for tokens below the expert's count and columns below its
// width; a 16-byte piece that is not whole or not 16-byte aligned in out is stored value by value.
#pragma once

#include <cuda/std/cstdint>

#include <cute/arch/util.hpp>
#include <cutlass/arch/barrier.h>

#include "mxfp4_epilogue.cuh"
#include "mxfp4_row_scales.cuh"
#include "mxfp4_scheduler.cuh"

namespace mxfp4 {

// bar.sync of every consumer thread (hardware barrier 5: 0 is __syncthreads, 1..4 the stream-K fix-up's).
template <int Warpgroups>
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 5, %0;" ::"n"(128 * Warpgroups) : "memory");
}

// Two floats as a bf16 pair (lo in the low half), each rounded to nearest as float_to_bf16 does.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t bits;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(bits) : "f"(hi), "f"(lo));
  return bits;
}

// Four m8n8 bf16 matrices (this lane's fragment register of each), each written transposed: row j of the stored
// matrix (column j of the fragment) goes to the address that lane 8 x (matrix) + j gives.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t address, uint32_t r0, uint32_t r1, uint32_t r2,
                                                  uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.x4.trans.m8n8.shared.b16 [%0], {%1, %2, %3, %4};\n"
               :: "r"(address), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}

template <Epilogue Kind>
struct StagedLayout {
  static constexpr int Groups = Kind == Epilogue::SwiGLU ? 1 : 2;  // 16-byte groups of output columns per token
  static constexpr int RowBytes = 16 * Groups;
  static constexpr int TokensPerStore = 32 / Groups;  // tokens one stmatrix.x4 covers (4 matrices of 8 tokens)

  // The byte offset of token m's group h in a warp's staging rows.
  __device__ __forceinline__ static uint32_t offset(int m, int h) {
    int const swizzled = Groups == 2 ? h ^ ((m >> 2) & 1) : h;
    return static_cast<uint32_t>(m * RowBytes + swizzled * 16);
  }
};

// The value the direct epilogue would store for accumulator `acc` of weight row n and x row `row` (SwiGLU: n is the
// gate row, `up` the paired up row's accumulator).
template <Epilogue Kind, class Params>
__device__ __forceinline__ float staged_value(Params const& p, int expert, int row, int n, float acc, float up) {
  if constexpr (Kind == Epilogue::SwiGLU) {
    int const channel = (n >> 4) * 8 + (n & 7);
    return gpt_oss_swiglu(acc + bias_at(p, expert, 2 * channel), up + bias_at(p, expert, 2 * channel + 1), p.alpha,
                          p.limit);
  } else if constexpr (Kind == Epilogue::ScaleScatter) {
    return (acc + bias_at(p, expert, n)) * p.row_scale[row];
  } else {
    return acc;
  }
}

// Scales (FP8 activations) and stores one consumer warpgroup's part of a tile through `staging` (the x part of a ring slot that no one else
// touches until this returns).
template <class Cfg, class Params, int A, int Acc>
__device__ __forceinline__ void store_tile_staged(float const (&acc)[A][Acc], Params const& p, Tile const& tile,
                                                  ExpertRows const& rows, int consumer, int tid, uint8_t* staging) {
  constexpr Epilogue Kind = Cfg::EpilogueKind;
  using Layout = StagedLayout<Kind>;
  constexpr int Chunk = Cfg::StagedChunk;  // TileConfig.staged_chunk
  static_assert(Chunk % Layout::TokensPerStore == 0 && Cfg::TileM % Chunk == 0, "whole stmatrix blocks, whole tiles");
  static_assert(4 * Cfg::Warpgroups * Chunk * Layout::RowBytes <= Cfg::XStageBytes, "every warp's rows in the slot");
  int const warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  int const m_base = tile.m_tile * Cfg::TileM;
  int const m_limit = rows.count - m_base;  // valid tokens in this tile
  uint8_t const* const mine = staging + (consumer * 4 + warp) * Chunk * Layout::RowBytes;  // this warp's rows
  uint32_t const base = cute::cast_smem_ptr_to_uint(mine);
  bool const scaled = p.x_scale != nullptr;  // FP8 activations: row scales (mxfp4_row_scales.cuh)
  // 16-byte stores need 16-byte aligned rows of out; otherwise every piece goes value by value.
  bool const aligned = ((reinterpret_cast<uintptr_t>(p.out) | static_cast<uintptr_t>(p.out_cols) * 2u) & 15u) == 0;
  // stmatrix: lane L gives the address of row L & 7 of matrix L >> 3; with two groups matrix j is token block
  // j >> 1, group j & 1; with one group, token block j.
  // Token bits 0-2 (and so the swizzle) come from the lane alone: stmatrix s of a chunk writes at a constant
  // s x TokensPerStore rows past the lane's first address.
  uint32_t const lane_address =
      base + Layout::offset(8 * (Layout::Groups == 2 ? (lane >> 4) : (lane >> 3)) + (lane & 7),
                            Layout::Groups == 2 ? ((lane >> 3) & 1) : 0);
#pragma unroll
  for (int a = 0; a < A; ++a) {
    int const n_warp = tile.n_tile * Cfg::TileN + (consumer * Cfg::AtomsPerWarpgroup + a) * kAtomN + 16 * warp;
#pragma unroll
    for (int c0 = 0; c0 < Cfg::TileM; c0 += Chunk) {
      // Values in, one stmatrix per TokensPerStore tokens.
#pragma unroll
      for (int s = 0; s < Chunk / Layout::TokensPerStore; ++s) {
        uint32_t r[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          int const block = (c0 + s * Layout::TokensPerStore) / 8 + (Layout::Groups == 2 ? (j >> 1) : j);
          int const h = Layout::Groups == 2 ? (j & 1) : 0;
          int const m = 8 * block + 2 * t;
          int const row = rows.start + m_base + m;
          // Tokens at or past m_limit and weight rows at or past n are staged as 0 and never stored: their row
          // scale and bias are not read. Accumulator 4 block + 2 h + r: weight row g + 8 h, token m + r; SwiGLU
          // pairs gate 4 block + r with up 4 block + r + 2.
          int const n = n_warp + g + 8 * h;
          int const k0 = 4 * block + 2 * h;
          float v0 = 0.0f, v1 = 0.0f;
          if (n < p.n) {
            // The row scales of FP8 activations (mxfp4_row_scales.cuh), here rather than over the whole tile first,
            // so that the tile's scales never sit in registers beside its accumulators.
            // Factors of 1 (bf16 activations) leave the accumulators exactly as they are.
            float const x0 = scaled ? x_row_factor(p, row, m < m_limit) : 1.0f;
            float const x1 = scaled ? x_row_factor(p, row + 1, m + 1 < m_limit) : 1.0f;
            float const w = scaled ? w_row_factor<Cfg::Fp8>(p, tile.expert, n) : 1.0f;
            if constexpr (Kind == Epilogue::SwiGLU) {
              float const w_up = scaled ? w_row_factor<Cfg::Fp8>(p, tile.expert, n + 8) : 1.0f;
              v0 = staged_value<Kind>(p, tile.expert, row, n, acc[a][k0] * (x0 * w), acc[a][k0 + 2] * (x0 * w_up));
              v1 = staged_value<Kind>(p, tile.expert, row + 1, n, acc[a][k0 + 1] * (x1 * w),
                                      acc[a][k0 + 3] * (x1 * w_up));
            } else {
              if (Kind == Epilogue::Store || m < m_limit)
                v0 = staged_value<Kind>(p, tile.expert, row, n, acc[a][k0] * (x0 * w), 0.0f);
              if (Kind == Epilogue::Store || m + 1 < m_limit)
                v1 = staged_value<Kind>(p, tile.expert, row + 1, n, acc[a][k0 + 1] * (x1 * w), 0.0f);
            }
          }
          r[j] = pack_bf16x2(v0, v1);
        }
        stmatrix_x4_trans(lane_address + s * Layout::TokensPerStore * Layout::RowBytes, r[0], r[1], r[2], r[3]);
      }
      __syncwarp();
      // Pieces out: 16 bytes each, Chunk x Groups of them (a loop, not unrolled: the tile's accumulators are still
      // live, and unrolled loads in flight would spill them).
#pragma unroll 1
      for (int piece = lane; piece < Chunk * Layout::Groups; piece += 32) {
        int const m_local = piece / Layout::Groups, h = piece % Layout::Groups;
        int const m = c0 + m_local;
        if (m < m_limit) {
          uint4 const bits = *reinterpret_cast<uint4 const*>(mine + Layout::offset(m_local, h));
          int const row = rows.start + m_base + m;
          int const out_row = Kind == Epilogue::ScaleScatter ? p.row_dest[row] : row;
          int column0, columns;  // first output column of the piece, and how many of its 8 exist
          if constexpr (Kind == Epilogue::SwiGLU) {
            column0 = (n_warp >> 4) * 8;
            // channel c's gate row is (c >> 3) x 16 + (c & 7): the 8 channels exist while n_warp + j < n
            columns = max(0, min(8, p.n - n_warp));
          } else {
            column0 = n_warp + 8 * h;
            columns = max(0, min(8, p.n - column0));
          }
          uint16_t* out = p.out + static_cast<size_t>(out_row) * p.out_cols + column0;
          if (columns == 8 && aligned) {
            *reinterpret_cast<uint4*>(out) = bits;
          } else {
            uint32_t const words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (e < columns) out[e] = static_cast<uint16_t>(words[e >> 1] >> (16 * (e & 1)));
          }
        }
      }
      __syncwarp();  // the next chunk's stmatrix overwrites what these lanes just read
    }
  }
  // The producer's next TMA load into this slot (async proxy) must come after these generic-proxy writes.
  cutlass::arch::fence_view_async_shared();
}

}  // namespace mxfp4
