// In-register MXFP4 decode for the packed Hopper layout (mxfp4/layout.py is the contract).
//
// A thread's 32-bit code word for one k16 step holds 8 E2M1 nibbles; nibbles j and j+4 are the
// low and high bf16 of WGMMA A-register j. An E2M1 nibble s|e1 e0|m placed as bf16 bits
// s<<15 | (e1 e0 m)<<6 is exactly its value times 2^-126 (e = 0 lands on bf16 subnormals,
// which is E2M1's own subnormal), so decode is shifts and masks, and the scale
// 2^(s-127) together with the 2^126 rebias is a power of two that we build by shifting the
// E8M0 byte into a bf16 exponent field: no float conversion, no table.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

// Register j (0..3) of the A fragment from a k16 code word: nibble j -> bits 6..8 (e, m) and 15
// (sign) of the low bf16, nibble j + 4 -> the same bits of the high bf16.
template <int J>
__device__ __forceinline__ uint32_t decode_e2m1_pair(uint32_t word) {
  uint32_t const shifted = word >> (4 * J);
  return ((shifted & 0x00070007u) << 6) | ((shifted & 0x00080008u) << 12);
}

// Two bf16 factors whose product is 2^(scale - 1) = 2^126 * 2^(scale - 127), each a normal bf16
// for every scale byte, so value * lo * hi is exact (up to bf16 overflow, as for the true value).
// 0xFF (NaN in E8M0) gives a NaN factor. Returned as bf16x2 pairs with both halves equal.
struct ScalePair {
  uint32_t lo;
  uint32_t hi;
};

__device__ __forceinline__ ScalePair e8m0_scale_factors(uint32_t scale_byte) {
  uint32_t const below = min(scale_byte, 128u);  // 2^(below - 1): exponent field below + 126
  uint32_t const above = max(scale_byte, 128u);  // 2^(above - 128): exponent field above - 1
  uint32_t const lo = (below + 126u) << 7;
  uint32_t const hi = scale_byte == 0xFFu ? 0x7FC0u : (above - 1u) << 7;
  return {lo | (lo << 16), hi | (hi << 16)};
}

__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// Decode one k16 step into the four A registers. `scales` holds this row pair's factors for the
// step's 32-block: index 0 for row g, 1 for row g + 8.
__device__ __forceinline__ void decode_k16(uint32_t word, ScalePair const (&scales)[2], uint32_t (&a)[4]) {
  a[0] = mul_bf16x2(mul_bf16x2(decode_e2m1_pair<0>(word), scales[0].lo), scales[0].hi);
  a[1] = mul_bf16x2(mul_bf16x2(decode_e2m1_pair<1>(word), scales[1].lo), scales[1].hi);
  a[2] = mul_bf16x2(mul_bf16x2(decode_e2m1_pair<2>(word), scales[0].lo), scales[0].hi);
  a[3] = mul_bf16x2(mul_bf16x2(decode_e2m1_pair<3>(word), scales[1].lo), scales[1].hi);
}

}  // namespace mxfp4
