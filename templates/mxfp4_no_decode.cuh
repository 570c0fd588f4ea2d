// Diagnostic only: the MMA roof. Compiled in with -DMXFP4_NO_DECODE (`bench ncu-case --prefill --configs ...
// --mma-roof`; no shipped kernel is built with it), a consumer's A fragments are its loaded code words as they are:
// no decode, no scale. The producer, the barriers, the shared-memory loads of the codes, the WGMMAs, the register
// buffers and the epilogue stay as shipped, so the time of this build is what the pipeline and the tensor cores
// cost with a decode that costs nothing: the ceiling of any decode-side change at that tile config. The output is
// not the product (the fragments are raw code bits: some are NaN or Inf), but every store stays in bounds.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

// A function, not a namespace-scope constant: the shipped build must stay byte for byte what it was (see
// copy_only_build).
__device__ __forceinline__ constexpr bool no_decode_build() {
#ifdef MXFP4_NO_DECODE
  return true;
#else
  return false;
#endif
}

// Register r of WGMMA step s's A fragment takes code word (r + s) mod 4 of its atom: moves only, and no two steps
// with the same registers.
template <int Atoms, int Steps>
__device__ __forceinline__ void raw_fragments(uint4 const (&codes)[Atoms], uint32_t (&frag)[Atoms][Steps][4]) {
#pragma unroll
  for (int a = 0; a < Atoms; ++a) {
    uint32_t const words[4] = {codes[a].x, codes[a].y, codes[a].z, codes[a].w};
#pragma unroll
    for (int s = 0; s < Steps; ++s)
#pragma unroll
      for (int r = 0; r < 4; ++r) frag[a][s][r] = words[(r + s) % 4];
  }
}

}  // namespace mxfp4
