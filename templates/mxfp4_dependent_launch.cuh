// Programmatic dependent launch (PDL) for every kernel of ours (codegen/runtime/dependent_launch.py turns it on).
//
// Launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (or behind a programmatic graph edge), a
// kernel may start while the kernel before it on the stream still runs: its CTAs take SM room as the earlier
// kernel's CTAs leave, so the launch's latency hides under the earlier kernel's tail. Correct only if the kernel
// touches no global memory until the earlier grid has completed and its writes are visible: hence
// `begin_dependent_grid` first, before any global load or store (a write would race the earlier kernel's reads
// just as a read would race its writes). Launched without the attribute, griddepcontrol.wait returns at once,
// so the same cubin serves both launches.
#pragma once

namespace mxfp4 {

// Wait for the grids this launch depends on (complete, writes visible), then let the next kernel on the stream
// launch early (griddepcontrol.launch_dependents: the next grid may start once every CTA of this one has run it).
// The order matters: a CTA of ours signals only after its own wait has passed, so a kernel two launches on never
// starts before this kernel's predecessor has completed.
__device__ __forceinline__ void begin_dependent_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

}  // namespace mxfp4
