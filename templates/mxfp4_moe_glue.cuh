// The fused MoE layer's two data movers around its grouped GEMMs (codegen/runtime/moe_glue.py launches them):
//
//   gather_rows   rows[r] = x[row_token[r]] for the routed rows r < offsets[E] (one CTA per row), and, in the
//                 same launch, the stream-K tile counters of the two GEMMs that follow set to zero (they
//                 run after it on the stream), so the layer needs no separate memset;
//   topk_sum      out[t, h] = bf16(((slots[t, 0, h] + slots[t, 1, h]) + ...) + slots[t, k - 1, h]) in fp32,
//                 summed in slot order j = 0 .. k - 1 (one fixed order: every call gives the same bits).
#pragma once

#include <cuda/std/cstdint>

#include "mxfp4_epilogue.cuh"

namespace mxfp4 {

// Copies `count` elements from src to dst, the CTA's threads in turn, each thread's loads of four steps in
// flight together before its stores (a gpt-oss row is 360 16-byte vectors: one round of 128 threads).
template <class Element>
__device__ __forceinline__ void copy_elements(Element* __restrict__ dst, Element const* __restrict__ src, int count) {
  constexpr int kSteps = 4;
  for (int base = threadIdx.x; base < count; base += kSteps * blockDim.x) {
    Element staged[kSteps];
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
      if (base + s * blockDim.x < count) staged[s] = src[base + s * blockDim.x];
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
      if (base + s * blockDim.x < count) dst[base + s * blockDim.x] = staged[s];
  }
}

// Copies `bytes` from src to dst: 16 bytes at a time when both are 16-byte aligned (vector16), else 2.
__device__ __forceinline__ void copy_row(uint8_t* dst, uint8_t const* src, int bytes, bool vector16) {
  if (vector16) {
    copy_elements(reinterpret_cast<uint4*>(dst), reinterpret_cast<uint4 const*>(src), bytes / 16);
  } else {
    copy_elements(reinterpret_cast<uint16_t*>(dst), reinterpret_cast<uint16_t const*>(src), bytes / 2);
  }
}

template <class Params>
__device__ __forceinline__ void gather_rows(Params const& p) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.zero_words; i += gridDim.x * blockDim.x)
    p.zero[i] = 0;
  int const row = blockIdx.x;
  if (row >= p.offsets[p.num_experts]) return;  // rows the routing did not place (ids outside [0, E))
  int const token = p.row_token[row];
  copy_row(static_cast<uint8_t*>(p.rows) + static_cast<size_t>(row) * p.row_bytes,
           static_cast<uint8_t const*>(p.x) + static_cast<size_t>(token) * p.row_bytes, p.row_bytes,
           p.vector16 != 0);
}

// Eight consecutive columns per thread: 16-byte loads of each slot, fp32 sums in slot order.
template <class Params>
__device__ __forceinline__ void topk_sum(Params const& p) {
  int const vectors_per_row = p.cols / 8;
  int const v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= p.tokens * vectors_per_row) return;
  int const token = v / vectors_per_row;
  int const column = (v - token * vectors_per_row) * 8;
  uint16_t const* slot = p.slots + static_cast<size_t>(token) * p.top_k * p.cols + column;
  float acc[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) acc[c] = 0.0f;
  for (int j = 0; j < p.top_k; ++j) {
    uint4 const packed = *reinterpret_cast<uint4 const*>(slot + static_cast<size_t>(j) * p.cols);
    uint32_t const words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int c = 0; c < 8; ++c)
      acc[c] += bf16_to_float(static_cast<uint16_t>(words[c / 2] >> (16 * (c % 2))));
  }
  uint32_t out_words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w)
    out_words[w] = static_cast<uint32_t>(float_to_bf16(acc[2 * w])) |
                   (static_cast<uint32_t>(float_to_bf16(acc[2 * w + 1])) << 16);
  *reinterpret_cast<uint4*>(p.out + static_cast<size_t>(token) * p.cols + column) =
      make_uint4(out_words[0], out_words[1], out_words[2], out_words[3]);
}

}  // namespace mxfp4
