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

// Register J (0..3) of the A fragment from a k16 code word: nibble J -> bits 6..8 (e, m) and 15
// (sign) of the low bf16, nibble J + 4 -> the same bits of the high bf16.
template <int J>
__device__ __forceinline__ uint32_t decode_e2m1_pair(uint32_t word) {
  uint32_t const em = (J >= 2 ? word >> (4 * J - 6) : word << (6 - 4 * J)) & 0x01C001C0u;
  uint32_t const sign = (word << (12 - 4 * J)) & 0x80008000u;
  return em | sign;
}

// Fast path, for four scale bytes that are all below 128 (weights below 2^0 x 6: what real
// checkpoints hold): 2^(s - 1) = 2^126 * 2^(s - 127) is one normal bf16 with exponent field s + 126,
// so one multiply per register applies scale and rebias together. Returned as bf16x2 {f, f}
// per scale byte, built with a byte-wise add, a byte permute and a shift.
__device__ __forceinline__ void e8m0_factors_below_128(uint32_t scales, uint32_t (&factor)[4]) {
  uint32_t const biased = scales + 0x7E7E7E7Eu;  // s + 126 in every byte; no carries when s < 128
  factor[0] = __byte_perm(biased, 0u, 0x0404u) >> 1;  // [0, b0, 0, b0] >> 1 = {b0 << 7, b0 << 7}
  factor[1] = __byte_perm(biased, 0u, 0x1414u) >> 1;
  factor[2] = __byte_perm(biased, 0u, 0x2424u) >> 1;
  factor[3] = __byte_perm(biased, 0u, 0x3434u) >> 1;
}

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

// Decode one k16 step into the four A registers, general path. `scales` holds this row pair's
// factors for the step's 32-block: index 0 for row g, 1 for row g + 8.
__device__ __forceinline__ void decode_k16(uint32_t word, ScalePair const (&scales)[2], uint32_t (&a)[4]) {
  a[0] = mul_bf16x2(mul_bf16x2(decode_e2m1_pair<0>(word), scales[0].lo), scales[0].hi);
  a[1] = mul_bf16x2(mul_bf16x2(decode_e2m1_pair<1>(word), scales[1].lo), scales[1].hi);
  a[2] = mul_bf16x2(mul_bf16x2(decode_e2m1_pair<2>(word), scales[0].lo), scales[0].hi);
  a[3] = mul_bf16x2(mul_bf16x2(decode_e2m1_pair<3>(word), scales[1].lo), scales[1].hi);
}

// Fast path: one multiply per register by the factors of e8m0_factors_below_128 (row g: row_g,
// row g + 8: row_g8).
__device__ __forceinline__ void decode_k16(uint32_t word, uint32_t row_g, uint32_t row_g8, uint32_t (&a)[4]) {
  a[0] = mul_bf16x2(decode_e2m1_pair<0>(word), row_g);
  a[1] = mul_bf16x2(decode_e2m1_pair<1>(word), row_g8);
  a[2] = mul_bf16x2(decode_e2m1_pair<2>(word), row_g);
  a[3] = mul_bf16x2(decode_e2m1_pair<3>(word), row_g8);
}

}  // namespace mxfp4
