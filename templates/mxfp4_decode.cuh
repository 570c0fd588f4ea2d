// In-register MXFP4 decode for the packed Hopper layout (mxfp4/format/layout.py is the contract).
//
// A thread's 32-bit code word for one k16 step holds 8 E2M1 codes (slots j and j+4 are the low and
// high bf16 of WGMMA A-register j), their bits spread over the word at pack time so that each
// register is a rotate and a mask away. An E2M1 code s|e1 e0|m placed as bf16 bits
// s<<15 | (e1 e0 m)<<6 is exactly its value times 2^-126 (e = 0 lands on bf16 subnormals,
// which is E2M1's own subnormal), so decode is shifts and masks, and the scale
// 2^(s-127) together with the 2^126 rebias is a power of two that we build by shifting the
// E8M0 byte into a bf16 exponent field: no float conversion, no table.
//
// The rotate amounts and half masks (kDecodeRotate<j><p>, kDecodeHalfMask<j><p>: piece p of
// register j, mask 0 = no such piece) are mxfp4/format/layout.py's DECODE_PIECES, rendered into the
// generated source before this header.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

constexpr int kPieceRotate[4][2] = {{kDecodeRotate00, kDecodeRotate01},
                                    {kDecodeRotate10, kDecodeRotate11},
                                    {kDecodeRotate20, kDecodeRotate21},
                                    {kDecodeRotate30, kDecodeRotate31}};
constexpr int kPieceHalfMask[4][2] = {{kDecodeHalfMask00, kDecodeHalfMask01},
                                      {kDecodeHalfMask10, kDecodeHalfMask11},
                                      {kDecodeHalfMask20, kDecodeHalfMask21},
                                      {kDecodeHalfMask30, kDecodeHalfMask31}};

// One piece: the word rotated left by Rotate and masked to HalfMask in both bf16 halves. Where
// no kept bit wraps around, a plain shift does (ptxas may issue it as IMAD.SHL on the FMA pipe,
// off the integer pipe that the masks and rotates share).
template <int Rotate, int HalfMask>
__device__ __forceinline__ uint32_t decode_piece(uint32_t word) {
  constexpr uint32_t mask = static_cast<uint32_t>(HalfMask) * 0x00010001u;
  static_assert(Rotate >= 0 && Rotate < 32 && (HalfMask >> 16) == 0, "a rotate of a 32-bit word, a 16-bit mask");
  if constexpr (HalfMask == 0) {
    return 0u;
  } else if constexpr (Rotate == 0) {
    return word & mask;
  } else if constexpr ((mask & ((1u << Rotate) - 1u)) == 0u) {
    return (word << Rotate) & mask;
  } else {
    return __funnelshift_l(word, word, Rotate) & mask;
  }
}

// Register J (0..3) of the A fragment from a k16 code word: slot J as the low bf16, slot J + 4 as
// the high bf16, each with bits m, e0, e1, s at 6, 7, 8, 15 (value * 2^-126).
template <int J>
__device__ __forceinline__ uint32_t decode_e2m1_pair(uint32_t word) {
  return decode_piece<kPieceRotate[J][0], kPieceHalfMask[J][0]>(word) |
         decode_piece<kPieceRotate[J][1], kPieceHalfMask[J][1]>(word);
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
