// Per-row e4m3 quantization of bf16 activations (mxfp4.quantize_activations; mxfp4/ops/activations.py says
// the arithmetic, and its torch composition rounds at the same points):
//
//   scale[r] = amax(|x[r, :]|) / 448  (1 for an all-zero row);  out[r, k] = e4m3(x[r, k] / scale[r])
//
// One warp per row of out; with source_rows, row r of out is row source_rows[r] of x (a gather). A row of up to
// 3072 values whose K is a multiple of 8 (and 16-byte aligned) is read once into registers (16 bytes per lane per
// load, all in flight together), then its amax (a warp max), the division and the conversion (8 bytes per store);
// longer rows take two passes (the amax, then the rest from L1/L2), and any other K goes one value at a time.
#pragma once

#include <cuda/std/cstdint>
#include <cuda_fp8.h>

namespace mxfp4 {

constexpr float kE4M3Max = 448.0f;

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Two values divided by the row scale (IEEE division, rounded once) and rounded to e4m3 (nearest even,
// saturated to +-448; the division never exceeds 448 by more than its rounding).
__device__ __forceinline__ uint16_t quantize_pair(float a, float b, float scale) {
  return __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(a, scale), __fdiv_rn(b, scale)), __NV_SATFINITE, __NV_E4M3);
}

// The largest magnitude of eight bf16 values (one 16-byte vector).
__device__ __forceinline__ float vector_amax(uint4 eight) {
  uint32_t const words[4] = {eight.x, eight.y, eight.z, eight.w};
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    amax = fmaxf(amax, fmaxf(fabsf(bf16_bits_to_float(words[i] & 0xFFFFu)), fabsf(bf16_bits_to_float(words[i] >> 16))));
  return amax;
}

// Eight bf16 values -> eight e4m3 bytes.
__device__ __forceinline__ uint2 quantize_vector(uint4 eight, float scale) {
  uint32_t const words[4] = {eight.x, eight.y, eight.z, eight.w};
  uint32_t packed[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint32_t const lo = quantize_pair(bf16_bits_to_float(words[2 * i] & 0xFFFFu), bf16_bits_to_float(words[2 * i] >> 16), scale);
    uint32_t const hi = quantize_pair(bf16_bits_to_float(words[2 * i + 1] & 0xFFFFu), bf16_bits_to_float(words[2 * i + 1] >> 16), scale);
    packed[i] = lo | (hi << 16);
  }
  return make_uint2(packed[0], packed[1]);
}

// A row of up to 32 x 8 x kHeldVectors values (gpt-oss's K = 2880 included) is read once, into registers: all of a
// lane's loads are in flight together, so a short row costs one memory latency, not one per load as a loop whose
// every load feeds the next step would (decode-sized calls quantize a few rows and are pure latency).
constexpr int kHeldVectors = 12;

__device__ __forceinline__ int held_vectors(int k) { return k / 8; }

template <class Params>
__device__ __forceinline__ float quantize_held_row(Params const& p, uint16_t const* x, uint8_t* out, int lane) {
  int const vectors = held_vectors(p.k);
  uint4 held[kHeldVectors];
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < kHeldVectors; ++j) {
    int const v = lane + 32 * j;
    held[j] = v < vectors ? reinterpret_cast<uint4 const*>(x)[v] : make_uint4(0u, 0u, 0u, 0u);
  }
#pragma unroll
  for (int j = 0; j < kHeldVectors; ++j) amax = fmaxf(amax, vector_amax(held[j]));
  amax = warp_max(amax);
  float const scale = amax > 0.0f ? __fdiv_rn(amax, kE4M3Max) : 1.0f;
#pragma unroll
  for (int j = 0; j < kHeldVectors; ++j) {
    int const v = lane + 32 * j;
    if (v < vectors) reinterpret_cast<uint2*>(out)[v] = quantize_vector(held[j], scale);
  }
  return scale;
}

// Longer rows: two passes, the second from L1/L2.
template <class Params>
__device__ __forceinline__ float row_amax(Params const& p, uint16_t const* x, int lane) {
  float amax = 0.0f;
  if (p.vectorized) {
#pragma unroll 4
    for (int v = lane; v < p.k / 8; v += 32) amax = fmaxf(amax, vector_amax(reinterpret_cast<uint4 const*>(x)[v]));
  } else {
    for (int i = lane; i < p.k; i += 32) amax = fmaxf(amax, fabsf(bf16_bits_to_float(x[i])));
  }
  return warp_max(amax);
}

template <class Params>
__device__ __forceinline__ void quantize_row(Params const& p, uint16_t const* x, uint8_t* out, float scale, int lane) {
  if (p.vectorized) {
#pragma unroll 4
    for (int v = lane; v < p.k / 8; v += 32)
      reinterpret_cast<uint2*>(out)[v] = quantize_vector(reinterpret_cast<uint4 const*>(x)[v], scale);
  } else {
    for (int i = lane; i < p.k; i += 32)
      out[i] = static_cast<uint8_t>(quantize_pair(bf16_bits_to_float(x[i]), 0.0f, scale) & 0xFFu);
  }
}

template <class Params>
__device__ __forceinline__ void quantize_fp8_rows(Params const& p) {
  int const lane = threadIdx.x & 31;
  int const row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  int const source = p.source_rows != nullptr ? p.source_rows[row] : row;  // the MoE layer's gather, fused
  uint16_t const* x = p.x + static_cast<size_t>(source) * p.k;
  uint8_t* const out = p.out + static_cast<size_t>(row) * p.k;
  float scale;
  if (p.vectorized && held_vectors(p.k) <= 32 * kHeldVectors) {
    scale = quantize_held_row(p, x, out, lane);
  } else {
    scale = row_amax(p, x, lane);
    scale = scale > 0.0f ? __fdiv_rn(scale, kE4M3Max) : 1.0f;
    quantize_row(p, x, out, scale, lane);
  }
  if (lane == 0) p.scale[row] = scale;
}

}  // namespace mxfp4
