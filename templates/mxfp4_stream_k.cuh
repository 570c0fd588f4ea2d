// Stream-K fix-up: a tile whose k-steps were cut between CTAs (mxfp4_scheduler.cuh, WorkCursor) is
// summed by the CTA that finishes its share last, in k order, so the result does not depend on
// which CTA that is (bitwise deterministic), and nobody waits for another CTA (no spin, no
// co-residency assumption).
//
// Each cut share writes its fp32 accumulators to a workspace slot and adds its k-step count to the
// tile's counter (one per consumer warpgroup); the share that brings the counter to k_tiles reads
// the others' slots and runs the epilogue. The launcher zeroes the counters before every launch.
//
// Slots: a CTA's range (StreamKSplit) cuts at most two tiles, the one it starts in
// (slot 2b) and the one it ends in (slot 2b + 1; the same tile, if the range lies inside one, uses
// 2b). Workspace: [2 G slots][consumer warpgroups][accumulators per thread][128 threads] floats.
#pragma once

#include <cuda/std/cstdint>


namespace mxfp4 {

// bar.sync of consumer warpgroup `consumer`'s 128 threads on hardware barrier 1 + consumer (0 is
// __syncthreads), the id a compile-time constant: an id in a register makes ptxas reserve all 16
// hardware barriers, and barriers per CTA can limit how many CTAs share an SM.
template <int Id>
__device__ __forceinline__ void sync_128_threads() {
  asm volatile("bar.sync %0, 128;" ::"n"(Id) : "memory");
}

template <int Warpgroups>
__device__ __forceinline__ void warpgroup_sync(int consumer) {
  static_assert(Warpgroups >= 1 && Warpgroups <= 4, "one hardware barrier per consumer warpgroup, ids 1..4");
  if (consumer == 0) sync_128_threads<1>();
  if constexpr (Warpgroups > 1) if (consumer == 1) sync_128_threads<2>();
  if constexpr (Warpgroups > 2) if (consumer == 2) sync_128_threads<3>();
  if constexpr (Warpgroups > 3) if (consumer == 3) sync_128_threads<4>();
}

// The workspace slot of CTA `cta`'s share of the tile whose first k-step is `tile_begin`.
__device__ __forceinline__ int stream_k_slot(StreamKSplit const& split, int cta, int tile_begin) {
  return 2 * cta + (split.begin(cta) >= tile_begin ? 0 : 1);
}

// Called by all 128 threads of consumer warpgroup `consumer` after a cut share of `unit`: publish
// `acc`, and if this share completes the tile, replace `acc` by the whole tile's sum (k order) and
// return true (the caller then runs the epilogue).
template <int Warpgroups, int Atoms, int PerAtom, class Params>
__device__ __forceinline__ bool stream_k_fixup(float (&acc)[Atoms][PerAtom], Params const& p, WorkUnit const& unit,
                                               int k_tiles, int total_tiles, int consumer, int tid,
                                               int* last_flag) {
  constexpr int Count = Atoms * PerAtom;
  StreamKSplit const split(total_tiles * k_tiles, gridDim.x);
  int const tile_begin = unit.tile * k_tiles;
  auto slot_data = [&](int slot) {
    return p.workspace + (static_cast<size_t>(slot) * Warpgroups + consumer) * Count * 128 + tid;
  };
  float* const mine = slot_data(stream_k_slot(split, blockIdx.x, tile_begin));
#pragma unroll
  for (int i = 0; i < Count; ++i) __stcg(mine + i * 128, acc[i / PerAtom][i % PerAtom]);
  __threadfence();  // the stores are visible device-wide before the counter says so
  warpgroup_sync<Warpgroups>(consumer);
  if (tid == 0) {
    int const share = unit.k_end - unit.k_begin;
    int const done = atomicAdd(p.tile_counters + static_cast<size_t>(unit.tile) * Warpgroups + consumer, share) + share;
    *last_flag = done == k_tiles;
  }
  warpgroup_sync<Warpgroups>(consumer);
  if (!*last_flag) return false;
  __threadfence();  // acquire: the other shares' stores happened before their counter adds
  // Sum every share (this CTA's too, read back from its slot) in k order: the shares belong to
  // consecutive CTAs (owner() never names an empty range), so the sum does not depend on who is last.
#pragma unroll
  for (int i = 0; i < Count; ++i) acc[i / PerAtom][i % PerAtom] = 0.0f;
  int const last = split.owner(tile_begin + k_tiles - 1);
  for (int cta = split.owner(tile_begin); cta <= last; ++cta) {
    float const* share = slot_data(stream_k_slot(split, cta, tile_begin));
#pragma unroll
    for (int i = 0; i < Count; ++i) acc[i / PerAtom][i % PerAtom] += __ldcg(share + i * 128);
  }
  return true;
}

}  // namespace mxfp4
