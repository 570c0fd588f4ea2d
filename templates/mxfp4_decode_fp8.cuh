// In-register decode of the FP8-ready layout (mxfp4/format/layout.py, "The FP8-ready layout", is the contract)
// into the e4m3 A fragment of wgmma.m64nNk32 (W4A8 kernels).
//
// A thread's 16 bytes of an atom are four code words: word c is k32 step c >> 1 and row half h = c & 1
// (row g or g + 8); its low and high halves give A-registers h and h + 2 of that step. Each code keeps
// its E2M1 bits: a 3-bit magnitude index (e1 e0 m), placed in a PRMT selector nibble, and its sign, placed
// 4 bits below bit 7 of its e4m3 byte (register h) or at bit 7 (register h + 2). The block's exponent
// offset t from its row's largest block (stored as 8 t) selects the table: the e4m3 bytes of the eight
// E2M1 magnitudes times 2^(6 - t), which one multiply-add each builds from the t = 0 table (subtracting
// t from every exponent field; byte 0, the zero, stays 0). A register is then one PRMT (four table
// lookups) and one LOP3 that ORs the signs in: no float instruction, no table in memory.
//
// The table constants and masks (kFp8TableLo, kFp8TableHi, kFp8IndexMask, kFp8SignShift) are
// mxfp4/format/layout.py's FP8_* names, rendered into the generated source before this header.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

constexpr uint32_t kE4M3SignBits = 0x80808080u;  // the sign bit (bit 7) of each e4m3 byte of a register

struct Fp8Tables {
  uint32_t lo;  // e4m3 bytes of 0, 0.5, 1, 1.5 (x 2^(6 - t)): PRMT source bytes 0..3
  uint32_t hi;  // e4m3 bytes of 2, 3, 4, 6 (x 2^(6 - t)): PRMT source bytes 4..7
};

// The tables of one (row, block) from its stored byte 8 t (t steps of the e4m3 exponent field, whose lowest
// bit is bit 3; t <= 11: no byte borrows).
__device__ __forceinline__ Fp8Tables fp8_tables(uint32_t offset_byte) {
  return {kFp8TableLo - offset_byte * 0x01010100u, kFp8TableHi - offset_byte * 0x01010101u};
}

// PRMT in its default mode: result byte i = byte (selector >> 4 i) & 7 of {hi, lo}, or that byte's sign
// replicated where bit 4 i + 3 is set; only the selector's low 16 bits are read. As inline PTX, so that
// the compiler keeps one mask for both registers of a word (it narrows a __byte_perm selector's mask to
// the 16 bits read, and then needs a second mask for the high half).
__device__ __forceinline__ uint32_t prmt(uint32_t lo, uint32_t hi, uint32_t selector) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(lo), "r"(hi), "r"(selector));
  return d;
}

// Registers h (low half of the word's magnitudes) and h + 2 (high half) of one row half of a k32 step.
__device__ __forceinline__ void decode_word_fp8(uint32_t word, Fp8Tables tables, uint32_t& low, uint32_t& high) {
  uint32_t const index = word & static_cast<uint32_t>(kFp8IndexMask);  // sign bits cleared: no replication
  low = prmt(tables.lo, tables.hi, index) | ((word << kFp8SignShift) & kE4M3SignBits);
  high = prmt(tables.lo, tables.hi, index >> 16) | (word & kE4M3SignBits);
}

// One 64 x 64 atom's fragment of this thread: a[step][register] for the two k32 steps. ``offsets`` is the
// thread's block word: byte 2 step + h holds 8 t of (row half h, block step).
__device__ __forceinline__ void decode_atom_fp8(uint4 codes, uint32_t offsets, uint32_t (&a)[2][4]) {
  uint32_t const words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    int const step = c >> 1, half = c & 1;
    Fp8Tables const tables = fp8_tables(__byte_perm(offsets, 0u, 0x4440u + c));  // byte c, zero-extended
    decode_word_fp8(words[c], tables, a[step][half], a[step][half + 2]);
  }
}

}  // namespace mxfp4
