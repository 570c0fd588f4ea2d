// Sector stores (StoreMode::Sectors, TileConfig.store_path: the Store and ScaleScatter epilogues of tiles 64 to 127
// rows tall, and of taller ones whose line-store staging area does not fit). They write the same values to the same
// places as store_columns_paired, but as 16-byte stores: the 8 lanes of a warp that hold a row's 16 output columns
// (lanes 4 g + t, g = 0..7) transpose their values for two row groups among themselves, so that each lane ends with 8
// consecutive columns of one row and a warp's store fills a whole 32-byte sector on each of 16 rows (the paired stores
// half-fill 8 sectors on 8 rows). Why: the epilogue's cost is the sectors it moves, not its instructions (NOTES,
// seventh to ninth sessions: 8.0 sectors per request paired, 16.0 here; W4A8 gate_up M = 64 121.3 -> 117.3 us under
// Nsight). SwiGLU keeps the paired stores (a warp holds 8 output channels: 16 bytes of a row, half a sector).
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

// One butterfly stage of the transpose below, over index bit 2 or 1 (whole words): the lane whose g has the bit set
// gives away its words whose index lacks it and takes the partner's in their place; the other lane the reverse.
template <int LaneXor, int Low, int High>
__device__ __forceinline__ void exchange_words(uint32_t (&w)[4], bool bit_set) {
  uint32_t const send = bit_set ? w[Low] : w[High];
  uint32_t const recv = __shfl_xor_sync(0xffffffffu, send, LaneXor);
  if (bit_set) w[Low] = recv; else w[High] = recv;
}

// 8 x 8 transpose of 16-bit values among the 8 lanes 4 g + t (g = 0..7) of one t: on entry lane g holds elements
// q = 0..7, two per word (word k: q = 2 k low, 2 k + 1 high); on return it holds at index j what lane j held at
// index g. One butterfly stage per bit of g (lane xor 16, 8, 4): an element at (lane g, index q) whose bit differs
// between g and q moves to (g ^ bit, q ^ bit), so after the three it sits at (q, g).
__device__ __forceinline__ void transpose_8x8_halves(uint32_t (&w)[4], int g) {
  exchange_words<16, 0, 2>(w, g & 4);  // index bit 2: words 0, 1 against 2, 3
  exchange_words<16, 1, 3>(w, g & 4);
  exchange_words<8, 0, 1>(w, g & 2);   // index bit 1: words 0 against 1, 2 against 3
  exchange_words<8, 2, 3>(w, g & 2);
  bool const odd = g & 1;              // index bit 0: the halves of each word
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    uint32_t const send = odd ? w[k] : (w[k] >> 16);  // odd gives its low half, even its high half
    uint32_t const recv = __shfl_xor_sync(0xffffffffu, send, 4);
    w[k] = __byte_perm(w[k], recv, odd ? 0x3254u : 0x5410u);  // odd: (recv, own high); even: (own low, recv)
  }
}

// Whether 16-byte stores fit this launch (uniform): 16-byte aligned rows and column counts that split into whole
// 8-column pieces (gpt-oss's all do): the sector and line stores' test, and the coalesced-stores roof's. The paired
// stores cover the rest.
template <class Params>
__device__ __forceinline__ bool sixteen_byte_stores_fit(Params const& p) {
  return (p.n & 7) == 0 && (p.out_cols & 7) == 0 && (reinterpret_cast<size_t>(p.out) & 15u) == 0;
}

}  // namespace mxfp4
