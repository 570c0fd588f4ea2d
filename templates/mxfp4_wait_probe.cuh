// Diagnostic only: which side of the pipeline waits. Compiled in with -DMXFP4_WAIT_PROBE (the `bench waits`
// suite does; no shipped kernel is built with it), the producer thread and one thread of each consumer warpgroup
// time their barrier waits with clock64 and, at exit, add their sums into the global mxfp4_wait_probe (read back
// through cuModuleGetGlobal). Without the macro every call below compiles to nothing.
#pragma once

#include <cuda/std/cstdint>

#ifdef MXFP4_WAIT_PROBE
extern "C" __device__ unsigned long long mxfp4_wait_probe[8];
#endif

namespace mxfp4 {

// The sums, in the order codegen/runtime/launch.py's WAIT_PROBE_SLOTS names them.
enum WaitProbeSlot {
  kProbeProducerCycles,    // producer thread: cycles from its first to its last instruction
  kProbeProducerEmpty,     // ... of which waiting for a free slot (the empty barrier)
  kProbeProducerStages,    // stages it filled
  kProbeConsumerCycles,    // consumer warpgroup (thread 0): cycles in consume()
  kProbeConsumerFull,      // ... of which waiting for a stage's bytes (the full barrier)
  kProbeConsumerMma,       // ... of which waiting for its previous WGMMA batch (wgmma.wait_group)
  kProbeConsumerStages,    // stages it consumed
  kProbeSlots
};

struct WaitProbe {
#ifdef MXFP4_WAIT_PROBE
  unsigned long long sums[kProbeSlots] = {};
  long long const start = clock64();
  bool const leader;
  __device__ explicit WaitProbe(bool leader_) : leader(leader_) {}
  __device__ __forceinline__ long long now() const { return clock64(); }
  template <int Slot>
  __device__ __forceinline__ void add_since(long long since) { sums[Slot] += clock64() - since; }
  template <int Slot>
  __device__ __forceinline__ void count() { sums[Slot] += 1; }
  template <int TotalSlot>
  __device__ __forceinline__ void flush() {
    if (!leader) return;
    sums[TotalSlot] = clock64() - start;
#pragma unroll
    for (int i = 0; i < kProbeSlots; ++i)
      if (sums[i]) atomicAdd(&mxfp4_wait_probe[i], sums[i]);
  }
#else
  __device__ explicit WaitProbe(bool) {}
  __device__ __forceinline__ long long now() const { return 0; }
  template <int Slot>
  __device__ __forceinline__ void add_since(long long) {}
  template <int Slot>
  __device__ __forceinline__ void count() {}
  template <int TotalSlot>
  __device__ __forceinline__ void flush() {}
#endif
};

}  // namespace mxfp4
