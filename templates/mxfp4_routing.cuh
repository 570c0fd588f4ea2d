// MoE routing on the device: the T x k expert choices grouped by expert, stably (rows keep their flat
// (token, slot) order within an expert), so that the grouped GEMMs read the rows of one expert
// contiguously and every call gives the same permutation. One CTA: a shared-memory histogram, one
// warp's scan to offsets, then the rows in chunks of blockDim: the whole CTA stages a chunk's ids and
// weights in shared memory (one round of global latency per chunk, not per step), and one warp places
// them 32 per step (__match_any_sync ranks the lanes that chose the same expert). A choice whose id is
// outside [0, E) (expert parallelism's sentinel for another rank's expert, or any foreign id) belongs to no
// expert: it goes to a tail bucket after offsets[E] (in flat order too), with its own token and weight 0, so
// every row the gather reads is written, and the GEMMs, which stop at offsets[E], never compute it.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

// The bucket of choice i: its expert, or num_experts (the tail) for an id outside [0, E); an int64 id is
// compared before narrowing, so 2^32 + 1 cannot pass for expert 1.
template <class Params>
__device__ __forceinline__ int routed_bucket(Params const& p, int i) {
  int64_t const id = p.ids_int64 ? static_cast<int64_t const*>(p.topk_ids)[i]
                                 : static_cast<int64_t>(static_cast<int32_t const*>(p.topk_ids)[i]);
  return id >= 0 && id < p.num_experts ? static_cast<int>(id) : p.num_experts;
}

template <class Params>
__device__ __forceinline__ float routed_weight(Params const& p, int i) {
  if (p.weights_bf16) return __uint_as_float(static_cast<uint32_t>(static_cast<uint16_t const*>(p.topk_weights)[i]) << 16);
  return static_cast<float const*>(p.topk_weights)[i];
}

// cursor[e] <- rows of experts before e (exclusive scan, run by one full warp); offsets = the same + total;
// the tail's cursor[E] starts at that total.
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
  if (lane == 0) cursor[p.num_experts] = p.offsets[p.num_experts] = running;
}

// The staged rows chunk0 .. chunk0 + count in flat order, 32 per step; lanes that chose the same bucket
// take consecutive places. A tail row keeps its token (the gather reads it) and gets weight 0.
template <class Params>
__device__ __forceinline__ void place_rows(Params const& p, int* cursor, int const* bucket, float const* weight,
                                           int chunk0, int count, int lane) {
  unsigned const lower_lanes = (1u << lane) - 1u;
  for (int base = 0; base < count; base += 32) {
    int const j = base + lane;
    bool const live = j < count;
    int const b = live ? bucket[j] : -1;
    unsigned const same = __match_any_sync(0xffffffffu, b);
    int const place = live ? cursor[b] + __popc(same & lower_lanes) : 0;
    __syncwarp();
    if (live && (same >> lane) == 1u) cursor[b] += __popc(same);  // the group's highest lane moves it on
    __syncwarp();
    if (live) {
      p.row_dest[place] = chunk0 + j;
      p.row_token[place] = (chunk0 + j) / p.top_k;
      p.row_scale[place] = b < p.num_experts ? weight[j] : 0.0f;
    }
  }
}

// Shared memory: cursor[num_experts + 1] (the last: the tail's), then a chunk of blockDim staged buckets and
// weights.
template <class Params>
__device__ __forceinline__ void route_topk(Params const& p) {
  extern __shared__ int cursor[];
  int* const staged_bucket = cursor + p.num_experts + 1;
  float* const staged_weight = reinterpret_cast<float*>(staged_bucket + blockDim.x);
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) cursor[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < p.routed; i += blockDim.x) {
    int const b = routed_bucket(p, i);
    if (b < p.num_experts) atomicAdd(&cursor[b], 1);
  }
  __syncthreads();
  if (threadIdx.x < 32) scan_expert_counts(p, cursor, threadIdx.x);
  for (int chunk0 = 0; chunk0 < p.routed; chunk0 += blockDim.x) {
    int const i = chunk0 + threadIdx.x;
    if (i < p.routed) {
      staged_bucket[threadIdx.x] = routed_bucket(p, i);
      staged_weight[threadIdx.x] = routed_weight(p, i);
    }
    __syncthreads();  // also orders the scan (first chunk) before the placement
    if (threadIdx.x < 32) place_rows(p, cursor, staged_bucket, staged_weight, chunk0, min(blockDim.x, p.routed - chunk0), threadIdx.x);
    __syncthreads();  // the chunk is placed before the next one overwrites the stage
  }
}

}  // namespace mxfp4
