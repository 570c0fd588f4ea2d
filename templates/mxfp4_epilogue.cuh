// Epilogues of the grouped GEMM: what a consumer thread does with its fp32 accumulators.
//
//   Store         out[row, n] = acc                                           (the plain grouped GEMM)
//   SwiGLU        out[row, c] = gpt-oss activation of (gate + bias, up + bias) for channel c, where the
//                 weight's gate row of channel c and its up row were paired at pack time so that one
//                 thread holds both (rows 16b + j and 16b + 8 + j are channel 8b + j's gate and up)
//   ScaleScatter  out[dest[row], n] = (acc + bias[e, n]) * scale[row]         (MoE down projection:
//                 routing weight, and rows put back in token order for the top-k combine)
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

enum class Epilogue : int { Store = 0, SwiGLU = 1, ScaleScatter = 2 };

// How the Store and ScaleScatter epilogues write a tile (TileConfig.store_path, rendered into the config): Paired, one
// 4-byte store per two columns of a row (store_columns_paired; SwiGLU always, and the decode tiles); Sectors, 16-byte
// stores after a shuffle transpose (mxfp4_sector_stores.cuh); Lines, through a shared-memory staging area as whole
// 128-byte lines (mxfp4_line_stores.cuh).
enum class StoreMode : int { Paired = 0, Sectors = 1, Lines = 2 };

// Diagnostic, never shipped: -DMXFP4_PAIRED_STORES writes every tile with the paired stores whatever the config's
// store path (`--mma-roof` times it as "paired stores (before)"; tests/test_store_paths_gpu.py compares the bits).
__device__ __forceinline__ constexpr bool paired_stores_build() {
#ifdef MXFP4_PAIRED_STORES
  return true;
#else
  return false;
#endif
}

__device__ __forceinline__ uint16_t float_to_bf16(float value) {
  uint16_t bits;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
  return bits;
}

__device__ __forceinline__ float bf16_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

template <class Params>
__device__ __forceinline__ float bias_at(Params const& p, int expert, int column) {
  if (p.bias == nullptr) return 0.0f;
  return bf16_to_float(p.bias[static_cast<size_t>(expert) * p.bias_stride + column]);
}

// 1 / (1 + 2^x) on the special-function unit alone (ex2.approx.ftz, rcp.approx.ftz; ~2^-22 relative before the bf16
// rounding): inf -> 0, so a very negative gate gives glu = gate * 0 = -0. An IEEE `gate / (1 + __expf(..))` costs an
// FCHK and a branch around a slow-path call per output, which keeps ptxas from overlapping a tile's outputs: 1.5-1.8x
// the Store epilogue's cycles at prefill (benchmarks/NOTES.md, eleventh and twelfth sessions).
__device__ __forceinline__ float sigmoid_of_exp2(float x) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
  return r;
}

// transformers' GptOssExperts._apply_gate: gate clamped above, up clamped both ways, (up + 1) * glu.
__device__ __forceinline__ float gpt_oss_swiglu(float gate, float up, float alpha, float limit) {
  gate = fminf(gate, limit);
  up = fminf(fmaxf(up, -limit), limit);
  float const glu = gate * sigmoid_of_exp2(-alpha * 1.4426950408889634f * gate);  // exp(-a g) = 2^(-a log2(e) g)
  return (up + 1.0f) * glu;
}

// Two fp32 values as one bf16 pair, `low` in bits 0-15 (one F2FP; each half rounds as float_to_bf16 does).
__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
  uint32_t bits;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(bits) : "f"(high), "f"(low));
  return bits;
}

// SwiGLU's e4m3 output (mxfp4.moe's FP8 layer, p.out_row_scale set): the activated rows leave the gate_up kernel as
// e4m3(value / out_scale), out_scale a power of two from the clamp's bound on |SwiGLU| (mxfp4/ops/activations.py,
// swiglu_e4m3_scale), so the down kernel reads them without a quantizer between the two; bf16 otherwise.
template <class Params>
__device__ __forceinline__ bool swiglu_e4m3_output(Params const& p) {
  return p.out_row_scale != nullptr;
}

// Two fp32 values as one e4m3 pair, `low` in bits 0-7 (round to nearest even, saturating at +-448).
__device__ __forceinline__ uint16_t pack_e4m3x2(float low, float high) {
  uint16_t bits;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(bits) : "f"(high), "f"(low));
  return bits;
}

// The paired stores' exchange. A WGMMA accumulator thread holds, for one output column c, the values of two
// adjacent x rows (2t and 2t + 1), packed as `rows` (row 2t low); the thread of column c ^ 1 is lane ^ 4 (the next
// or previous g). After one shuffle the even-column lane holds row 2t at columns (c, c + 1) and the odd-column
// lane row 2t + 1 at (c - 1, c): one 4-byte store each instead of two 2-byte ones. Every lane of the warp calls it.
__device__ __forceinline__ uint32_t pair_columns(uint32_t rows, bool odd_column) {
  uint32_t const partner = __shfl_xor_sync(0xffffffffu, rows, 4);
  // even: (own low, partner's low); odd: (partner's high, own high)
  return __byte_perm(rows, partner, odd_column ? 0x3276u : 0x5410u);
}

// pair_columns for one-byte values: `rows` holds x rows 2t (bits 0-7) and 2t + 1 (bits 8-15) of column c; afterwards
// the even-column lane holds row 2t at (c, c + 1) and the odd-column lane row 2t + 1 at (c - 1, c), one 2-byte word.
__device__ __forceinline__ uint16_t pair_columns_bytes(uint32_t rows, bool odd_column) {
  uint32_t const partner = __shfl_xor_sync(0xffffffffu, rows, 4);
  // even: (own byte 0, partner's byte 0); odd: (partner's byte 1, own byte 1)
  return static_cast<uint16_t>(__byte_perm(rows, partner, odd_column ? 0x15u : 0x40u));
}

// Whether the paired stores apply: every pair of output columns (c, c + 1) with c even is 4-byte aligned and either
// both in range or both out (an even column count; gpt-oss's are all even). The plain stores cover the rest.
template <class Params>
__device__ __forceinline__ bool paired_stores_fit(Params const& p) {
  return (p.out_cols & 1) == 0 && (reinterpret_cast<size_t>(p.out) & 3u) == 0;
}

// Per-row values of one tile (TileM rows): lane l holds rows 32 j + l, and any lane reads row m of word m / 32 back with
// one shuffle. So a tile's row data (routing weights, destinations, x row scales) is loaded once per tile and row, not
// once per accumulator, and can be loaded early. Rows at or past m_limit get `fallback` (nothing past them is read).
template <int TileM, class T>
struct TileRowValues {
  static constexpr int Words = (TileM + 31) / 32;
  T value[Words];

  __device__ __forceinline__ void load(T const* tile_rows, int m_limit, int lane, T fallback) {
#pragma unroll
    for (int j = 0; j < Words; ++j) {
      int const m = 32 * j + lane;
      value[j] = m < m_limit && m < TileM ? tile_rows[m] : fallback;
    }
  }
  // Row m of the tile; `word` = m / 32, a compile-time constant in the unrolled loops that call this.
  __device__ __forceinline__ T at(int word, int m) const { return __shfl_sync(0xffffffffu, value[word], m & 31); }
};

// One accumulator of weight row n and x row `row` (Store, ScaleScatter).
template <Epilogue Kind, class Params>
__device__ __forceinline__ void store_one(Params const& p, int expert, int row, int n, float acc) {
  if constexpr (Kind == Epilogue::ScaleScatter) {
    float const value = (acc + bias_at(p, expert, n)) * p.row_scale[row];
    p.out[static_cast<size_t>(p.row_dest[row]) * p.out_cols + n] = float_to_bf16(value);
  } else {
    p.out[static_cast<size_t>(row) * p.out_cols + n] = float_to_bf16(acc);
  }
}

// The paired gate (row n) and up (row n + 8) accumulators of channel c of x row `row` (SwiGLU).
template <class Params>
__device__ __forceinline__ void store_swiglu(Params const& p, int expert, int row, int n, float gate, float up) {
  int const channel = (n >> 4) * 8 + (n & 7);
  gate += bias_at(p, expert, 2 * channel);  // the bias keeps transformers' interleaved order
  up += bias_at(p, expert, 2 * channel + 1);
  float const value = gpt_oss_swiglu(gate, up, p.alpha, p.limit);
  size_t const at = static_cast<size_t>(row) * p.out_cols + channel;
  if (swiglu_e4m3_output(p))
    reinterpret_cast<uint8_t*>(p.out)[at] = static_cast<uint8_t>(pack_e4m3x2(value * p.out_scale_inverse, 0.0f));
  else
    p.out[at] = float_to_bf16(value);
}

}  // namespace mxfp4
