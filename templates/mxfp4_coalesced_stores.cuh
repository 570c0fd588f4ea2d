// Diagnostic only: the price of the epilogue's store pattern. Compiled in with -DMXFP4_COALESCED_STORES (`bench
// ncu-case --prefill --configs ... --mma-roof`; no shipped kernel is built with it), a consumer warpgroup writes the
// same bytes as the shipped Store epilogue (the tile's valid rows, the warpgroup's output columns, after the same row
// scales) but each lane 16 contiguous bytes and each 8 lanes one whole 128-byte line of a row: a warp's store fills 4
// lines. The values are the accumulators in the wrong places, so the output is not the product.
//
// Why: a warp's store in the shipped epilogue half-fills 8 sectors on 8 rows (4 bytes per lane, two output columns of
// a row), 4096 half-written sectors per 256 x 128 tile; the paired stores halved its instructions but not its sectors,
// and its time fell little. Against the shipped build this build's time is what that pattern costs; against the
// no-epilogue build (mxfp4_no_epilogue.cuh), what writing the bytes at all costs while the tensor cores wait.
// Store epilogues only (what `bench ncu-case --prefill` runs); other kinds keep their stores, as does an output that
// 16-byte stores do not fit (sixteen_byte_stores_fit).
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

// A function, not a namespace-scope constant: the shipped build must stay byte for byte what it was.
__device__ __forceinline__ constexpr bool coalesced_stores_build() {
#ifdef MXFP4_COALESCED_STORES
  return true;
#else
  return false;
#endif
}

// Whether a warpgroup's TileM x Cols outputs split into 16-byte pieces evenly over its 128 threads (not for the
// decode tiles, whose 8-16 rows give a thread less than one piece: they keep the shipped stores).
template <int TileM, int Cols>
__device__ __forceinline__ constexpr bool coalesced_pieces_fit() {
  return Cols % 8 == 0 && TileM * (Cols / 8) % 128 == 0;
}

// The warpgroup's Cols output columns (from col0) of the tile's rows row0 .. row0 + m_limit, as 16-byte pieces:
// piece c of the warpgroup is row c / (Cols / 8), columns 8 (c % (Cols / 8)) ..+7; thread tid writes pieces
// 128 j + tid. The 8 values of a piece are 8 consecutive accumulators of the thread (all of them, once each).
template <int A, int Acc, int TileM, int Cols, class Params>
__device__ __forceinline__ void store_tile_coalesced(float const (&acc)[A][Acc], Params const& p, int row0, int m_limit,
                                                     int col0, int tid) {
  constexpr int PiecesPerRow = Cols / 8;
  constexpr int Pieces = TileM * PiecesPerRow / 128;  // per thread
  static_assert(Pieces * 8 == A * Acc, "every accumulator in exactly one piece");
#pragma unroll
  for (int j = 0; j < Pieces; ++j) {
    int const piece = 128 * j + tid;
    int const m = piece / PiecesPerRow;
    int const col = col0 + 8 * (piece % PiecesPerRow);
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      int const v = 8 * j + 2 * w;  // compile-time after unrolling
      words[w] = pack_bf16x2(acc[v / Acc][v % Acc], acc[(v + 1) / Acc][(v + 1) % Acc]);
    }
    if (m < m_limit && col + 8 <= p.out_cols)
      *reinterpret_cast<uint4*>(p.out + static_cast<size_t>(row0 + m) * p.out_cols + col) =
          make_uint4(words[0], words[1], words[2], words[3]);
  }
}

}  // namespace mxfp4
