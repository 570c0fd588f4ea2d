// Diagnostic only: the copy roof. Compiled in with -DMXFP4_COPY_ONLY (the `bench waits` suite does; no shipped
// kernel is built with it), the consumers skip decode and WGMMA: they wait for a stage's bytes, read one word of
// it and hand the slot straight back. The producer, the barriers, the scheduler and the TMA loads stay as shipped,
// so the time of this build is what the kernel's access pattern costs with consumers that cost nothing. The
// output is not the product (the epilogue stores what the accumulators hold), but every store stays in bounds.
// It combines with -DMXFP4_WAIT_PROBE (mxfp4_wait_probe.cuh) to time the copy-only build's waits.
#pragma once

#include <cuda/std/cstdint>

#include <cutlass/arch/barrier.h>

namespace mxfp4 {

// A function, not a namespace-scope constant: NVRTC emits such a constant into the cubin as a symbol, and the
// shipped build must stay byte for byte what it was before this diagnostic existed.
__device__ __forceinline__ constexpr bool copy_only_build() {
#ifdef MXFP4_COPY_ONLY
  return true;
#else
  return false;
#endif
}

// A copy-only consumer's stage: the full barrier has been waited on. One 4-byte shared load of the thread's own
// code bytes goes into an accumulator (so the stage is read, as the decode would read it), then one arrival per
// warp on the slot's empty barrier. mbarrier.arrive has release semantics: the load is done before the
// producer may refill the slot.
__device__ __forceinline__ void copy_only_stage(float& sink, uint8_t const* w_slot, int tid, uint64_t* empty) {
  uint32_t const word = *reinterpret_cast<uint32_t const*>(w_slot + tid * 16);
  sink += static_cast<float>(word & 1u);
  __syncwarp();
  if ((tid & 31) == 0) cutlass::arch::ClusterBarrier::arrive(empty);
}

}  // namespace mxfp4
