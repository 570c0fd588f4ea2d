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

#include "mxfp4_epilogue.cuh"
#include "mxfp4_scheduler.cuh"

namespace mxfp4 {

// One tile's row scales for consumer thread `tid`, whose accumulators acc[a][4 i + r] hold weight row
// n_base + kAtomN a + 8 (r >> 1) and tile row 8 i + 2 t + (r & 1) (the WGMMA accumulator layout, as store_tile reads
// it). The x scales sit one row per lane (TileRowValues) and the weight rows' scales per thread, so `load` is a few
// loads per thread, issued where the caller likes: the W4A8 kernel at the tile's start, their latency hidden under the
// k loop. Rows at or past m_limit and weight rows at or past n are never stored; their factors are 0 so that nothing
// past the scale arrays is read.
template <class Cfg>
struct TileRowScales {
  static constexpr int A = Cfg::AtomsPerWarpgroup;
  TileRowValues<Cfg::TileM, float> x;
  float w[A][2];

  template <class Params>
  __device__ __forceinline__ void load(Params const& p, Tile const& tile, ExpertRows const& rows, int first_atom,
                                       int tid) {
    if (p.x_scale == nullptr) return;  // uniform: bf16 activations
    int const m_base = tile.m_tile * Cfg::TileM;
    x.load(p.x_scale + rows.start + m_base, rows.count - m_base, tid & 31, 0.0f);
    int const n_base = thread_weight_row<Cfg::TileN>(tile, first_atom, tid);
#pragma unroll
    for (int a = 0; a < A; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int const n = n_base + kAtomN * a + 8 * h;
        w[a][h] = !Cfg::Fp8 ? 1.0f
                            : (n < p.n ? p.w_scale[static_cast<size_t>(tile.expert) * p.w_scale_stride + n] : 0.0f);
      }
  }

  template <class Params>
  __device__ __forceinline__ void apply(float (&acc)[A][Cfg::Accumulators], Params const& p, int tid) const {
    if (p.x_scale == nullptr) return;
    int const t = tid & 3;
#pragma unroll
    for (int i = 0; i < Cfg::Accumulators / 4; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float const xs = x.at(8 * i / 32, 8 * i + 2 * t + r);
#pragma unroll
        for (int a = 0; a < A; ++a) {
          acc[a][4 * i + r] *= xs * w[a][0];
          acc[a][4 * i + r + 2] *= xs * w[a][1];
        }
      }
  }
};

}  // namespace mxfp4
