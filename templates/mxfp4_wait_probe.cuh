// Diagnostic only: which side of the pipeline waits. Compiled in with -DMXFP4_WAIT_PROBE (the `bench waits`
// suite does; no shipped kernel is built with it), the producer thread and one thread of each consumer warpgroup
// time their barrier waits with clock64 and, at exit, add their sums into the global mxfp4_wait_probe (read back
// through cuModuleGetGlobal). Without the macro every call below compiles to nothing.
#pragma once

#include <cuda/std/cstdint>

#ifdef MXFP4_WAIT_PROBE
extern "C" __device__ unsigned long long mxfp4_wait_probe[16];  // WaitProbeSlot's sums (kProbeSlots <= 16)
extern "C" __device__ unsigned long long mxfp4_timeline[10];
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
  kProbeConsumerDrain,     // ... of which waiting for a unit's last WGMMAs (the wait_group 0 before its epilogue)
  kProbeConsumerEpilogue,  // ... of which in the epilogues (row scales, stores: until the last store is issued)
  kProbeConsumerUnits,     // work units it finished (tiles, or stream-K shares)
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
    static_assert(kProbeSlots <= 16, "mxfp4_wait_probe holds 16 sums");
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

// Where one launch's time goes (read after a single launch): each consumer warpgroup's thread 0 stamps the
// global timer (ns, one clock for all SMs) when consume() starts and ends, and counts clock64 cycles from its start
// to its first landed stage and to its end. Minima are kept as maxima of the complement, so every slot starts at 0.
// In the order codegen/runtime/launch.py's TIMELINE_SLOTS names them.
enum TimelineSlot {
  kLineStartMinNot,    // ~min over consumers of their start (ns)
  kLineStartMax,       // max of their start (ns)
  kLineEndMinNot,      // ~min of their end (ns)
  kLineEndMax,         // max of their end (ns)
  kLineFirstCycles,    // sum of cycles from start to the first landed stage (consumers that got work)
  kLineLanded,         // consumers that got work
  kLineBusyCycles,     // sum of cycles from start to end
  kLineBusyNs,         // sum of ns from start to end (with kLineBusyCycles: the SM clock)
  kLineConsumers,      // consumers counted
  kLineSlots
};

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

struct Timeline {
#ifdef MXFP4_WAIT_PROBE
  unsigned long long const start_ns = global_timer_ns();
  long long const start_cycles = clock64();
  long long first_cycles = -1;
  bool const leader;
  __device__ explicit Timeline(bool leader_) : leader(leader_) {}
  __device__ __forceinline__ void landed() {
    if (first_cycles < 0) first_cycles = clock64() - start_cycles;
  }
  __device__ __forceinline__ void flush() {
    if (!leader) return;
    long long const busy_cycles = clock64() - start_cycles;
    unsigned long long const end_ns = global_timer_ns();
    atomicMax(&mxfp4_timeline[kLineStartMinNot], ~start_ns);
    atomicMax(&mxfp4_timeline[kLineStartMax], start_ns);
    atomicMax(&mxfp4_timeline[kLineEndMinNot], ~end_ns);
    atomicMax(&mxfp4_timeline[kLineEndMax], end_ns);
    if (first_cycles >= 0) {
      atomicAdd(&mxfp4_timeline[kLineFirstCycles], static_cast<unsigned long long>(first_cycles));
      atomicAdd(&mxfp4_timeline[kLineLanded], 1ull);
    }
    atomicAdd(&mxfp4_timeline[kLineBusyCycles], static_cast<unsigned long long>(busy_cycles));
    atomicAdd(&mxfp4_timeline[kLineBusyNs], end_ns - start_ns);
    atomicAdd(&mxfp4_timeline[kLineConsumers], 1ull);
  }
#else
  __device__ explicit Timeline(bool) {}
  __device__ __forceinline__ void landed() {}
  __device__ __forceinline__ void flush() {}
#endif
};

}  // namespace mxfp4
