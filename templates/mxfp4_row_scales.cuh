// Row scales of FP8 activations, applied to the fp32 accumulators once per tile, before the epilogue:
//
//   acc[n, m] *= x_scale[row m] * w_scale[expert, n]      (W4A8: e4m3 x and the FP8-ready weights)
//   acc[n, m] *= x_scale[row m]                           (W4A16 kernel on e4m3 x widened to bf16)
//
// x_scale null (bf16 activations) leaves the accumulators as they are. The product of the two factors is
// formed first (w_scale is a power of two), so one rounding per accumulator; mxfp4/portable/fallback_fp8.py does
// the same.
#pragma once

#include <cuda/std/cstdint>

#include "mxfp4_scheduler.cuh"

namespace mxfp4 {

// acc[a][4 i + r]: weight row n_base + kAtomN a + 8 (r >> 1), tile row 8 i + 2 t + (r & 1) (the WGMMA
// accumulator layout, as store_tile reads it). Rows at or past m_limit and weight rows at or past n are
// never stored; their factors are 0 so that nothing past the scale arrays is read.
template <bool Fp8, int A, int Acc, class Params>
__device__ __forceinline__ void apply_row_scales(float (&acc)[A][Acc], Params const& p, int expert, int row0,
                                                 int m_limit, int n_base, int t) {
  if (p.x_scale == nullptr) return;  // uniform: bf16 activations
  float w[A][2];
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int const n = n_base + kAtomN * a + 8 * h;
      w[a][h] = !Fp8 ? 1.0f : (n < p.n ? p.w_scale[static_cast<size_t>(expert) * p.w_scale_stride + n] : 0.0f);
    }
#pragma unroll
  for (int i = 0; i < Acc / 4; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int const m = 8 * i + 2 * t + r;
      float const x = m < m_limit ? p.x_scale[row0 + m] : 0.0f;
#pragma unroll
      for (int a = 0; a < A; ++a) {
        acc[a][4 * i + r] *= x * w[a][0];
        acc[a][4 * i + r + 2] *= x * w[a][1];
      }
    }
}

// The tile's atoms first_atom, first_atom + 1, ... of consumer thread `tid` (the same accumulator-to-output mapping as
// store_tile).
template <class Cfg, int A, int Acc, class Params>
__device__ __forceinline__ void apply_tile_row_scales(float (&acc)[A][Acc], Params const& p, Tile const& tile,
                                                      ExpertRows const& rows, int first_atom, int tid) {
  int const n_base = tile.n_tile * Cfg::TileN + first_atom * kAtomN + 16 * (tid >> 5) + ((tid & 31) >> 2);
  int const m_base = tile.m_tile * Cfg::TileM;
  apply_row_scales<Cfg::Fp8>(acc, p, tile.expert, rows.start + m_base, rows.count - m_base, n_base, tid & 3);
}

}  // namespace mxfp4
