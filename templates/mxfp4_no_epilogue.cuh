// Diagnostic only: the epilogue's price. Compiled in with -DMXFP4_NO_EPILOGUE (`bench ncu-case --prefill --configs
// ... --mma-roof`; no shipped kernel is built with it), a consumer finishes a tile without the row scales and without
// its stores: the k loop, its waits and the WGMMAs stay as shipped, so the time of this build against the shipped
// one is what the epilogue costs while the tensor cores wait for it (the consumer warpgroups of a CTA finish a tile
// together, and nothing multiplies while they store). With -DMXFP4_NO_DECODE as well (mxfp4_no_decode.cuh), the
// pipeline and the tensor cores alone. The output is not the product: a store guarded by a test that no sum of the
// accumulators passes keeps every accumulator live, so nothing that feeds them can be dropped.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

// A function, not a namespace-scope constant: the shipped build must stay byte for byte what it was (see
// copy_only_build).
__device__ __forceinline__ constexpr bool no_epilogue_build() {
#ifdef MXFP4_NO_EPILOGUE
  return true;
#else
  return false;
#endif
}

// The accumulators' sum, stored (at out[0], which exists wherever a tile does) only when its bits are 0xFFFFFFFF: a
// NaN payload that GPU arithmetic never produces (its NaNs are 0x7FFFFFFF), so the store never happens, but the sum
// reads every accumulator and ptxas cannot prove the test false.
template <int A, int Acc>
__device__ __forceinline__ void keep_accumulators_live(float const (&acc)[A][Acc], uint16_t* out) {
  float sum = 0.0f;
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int i = 0; i < Acc; ++i) sum += acc[a][i];
  if (__float_as_uint(sum) == 0xFFFFFFFFu) *out = 0;
}

}  // namespace mxfp4
