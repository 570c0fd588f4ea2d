// MoE routing on the device: the T x k expert choices grouped by expert, stably (rows keep their flat
// (token, slot) order within an expert), so that the grouped GEMMs read the rows of one expert
// contiguously and every call gives the same permutation. One CTA: a shared-memory histogram, one
// warp's scan to offsets, then the rows in chunks of blockDim: the whole CTA stages a chunk's ids and
// weights in shared memory (one round of global latency per chunk, not per step), and one warp places
// them 32 per step (__match_any_sync ranks the lanes that chose the same expert). Ids outside [0, E)
// are left out (the op checks them where it can).
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

template <class Params>
__device__ __forceinline__ int routed_expert(Params const& p, int i) {
  return p.ids_int64 ? static_cast<int>(static_cast<int64_t const*>(p.topk_ids)[i])
                     : static_cast<int32_t const*>(p.topk_ids)[i];
}

template <class Params>
__device__ __forceinline__ float routed_weight(Params const& p, int i) {
  if (p.weights_bf16) return __uint_as_float(static_cast<uint32_t>(static_cast<uint16_t const*>(p.topk_weights)[i]) << 16);
  return static_cast<float const*>(p.topk_weights)[i];
}

// cursor[e] <- rows of experts before e (exclusive scan, run by one full warp); offsets = the same + total.
template <class Params>
__device__ __forceinline__ void scan_expert_counts(Params const& p, int* cursor, int lane) {
  int running = 0;
  for (int base = 0; base < p.num_experts; base += 32) {
    int const e = base + lane;
    int const count = e < p.num_experts ? cursor[e] : 0;
    int inclusive = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      int const up = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += up;
    }
    if (e < p.num_experts) cursor[e] = p.offsets[e] = running + inclusive - count;
    running += __shfl_sync(0xffffffffu, inclusive, 31);
  }
  if (lane == 0) p.offsets[p.num_experts] = running;
}

// The staged rows chunk0 .. chunk0 + count in flat order, 32 per step; lanes that chose the same expert
// take consecutive places.
template <class Params>
__device__ __forceinline__ void place_rows(Params const& p, int* cursor, int const* expert, float const* weight,
                                           int chunk0, int count, int lane) {
  unsigned const lower_lanes = (1u << lane) - 1u;
  for (int base = 0; base < count; base += 32) {
    int const j = base + lane;
    int const e = j < count ? expert[j] : -1;
    bool const valid = e >= 0 && e < p.num_experts;
    unsigned const same = __match_any_sync(0xffffffffu, valid ? e : -1);
    int const place = valid ? cursor[e] + __popc(same & lower_lanes) : 0;
    __syncwarp();
    if (valid && (same >> lane) == 1u) cursor[e] += __popc(same);  // the group's highest lane moves it on
    __syncwarp();
    if (valid) {
      p.row_dest[place] = chunk0 + j;
      p.row_token[place] = (chunk0 + j) / p.top_k;
      p.row_scale[place] = weight[j];
    }
  }
}

// Shared memory: cursor[num_experts], then a chunk of blockDim staged ids and weights.
template <class Params>
__device__ __forceinline__ void route_topk(Params const& p) {
  extern __shared__ int cursor[];
  int* const staged_expert = cursor + p.num_experts;
  float* const staged_weight = reinterpret_cast<float*>(staged_expert + blockDim.x);
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) cursor[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < p.routed; i += blockDim.x) {
    int const e = routed_expert(p, i);
    if (e >= 0 && e < p.num_experts) atomicAdd(&cursor[e], 1);
  }
  __syncthreads();
  if (threadIdx.x < 32) scan_expert_counts(p, cursor, threadIdx.x);
  for (int chunk0 = 0; chunk0 < p.routed; chunk0 += blockDim.x) {
    int const i = chunk0 + threadIdx.x;
    if (i < p.routed) {
      staged_expert[threadIdx.x] = routed_expert(p, i);
      staged_weight[threadIdx.x] = routed_weight(p, i);
    }
    __syncthreads();  // also orders the scan (first chunk) before the placement
    if (threadIdx.x < 32) place_rows(p, cursor, staged_expert, staged_weight, chunk0, min(blockDim.x, p.routed - chunk0), threadIdx.x);
    __syncthreads();  // the chunk is placed before the next one overwrites the stage
  }
}

}  // namespace mxfp4
