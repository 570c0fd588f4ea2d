// Candidate epilogue stores, not shipped: compiled in with -DMXFP4_SECTOR_STORES (`bench ncu-case --prefill --configs
// ... --mma-roof` times it beside the roofs; tests/test_candidate_stores_gpu.py checks it bit for bit against the
// shipped build). The Store and ScaleScatter epilogues write the same values to the same places as store_columns_paired, but
// as 16-byte stores: the 8 lanes of a warp that hold a row's 16 output columns (lanes 4 g + t, g = 0..7) transpose
// their values for two row groups among themselves, so that each lane ends with 8 consecutive columns of one row and
// a warp's store fills a whole 32-byte sector on each of 16 rows (the paired stores half-fill 8 sectors on 8 rows).
// Why: the paired stores halved the epilogue's store instructions and its time barely moved (NOTES, seventh and
// eighth sessions); mxfp4_coalesced_stores.cuh prices whole-line stores, this is the design that needs no shared
// memory. SwiGLU keeps the paired stores (a warp holds 8 output channels: 16 bytes of a row, half a sector).
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

__device__ __forceinline__ constexpr bool sector_stores_build() {
#ifdef MXFP4_SECTOR_STORES
  return true;
#else
  return false;
#endif
}

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
// 8-column pieces (gpt-oss's all do): the sector stores' test, and the coalesced-stores roof's. The paired stores
// cover the rest.
template <class Params>
__device__ __forceinline__ bool sixteen_byte_stores_fit(Params const& p) {
  return (p.n & 7) == 0 && (p.out_cols & 7) == 0 && (reinterpret_cast<size_t>(p.out) & 15u) == 0;
}

// The thread's 16-column slab (weight rows slab .. slab + 15 of the tile, n0 = slab + g) of tile rows 16 p .. 16 p +
// 15, p = 0 .. TileM / 16 - 1. Before the transpose, element q = 4 ii + 2 r + h of the thread is its accumulator for
// tile row 8 (2 p + ii) + 2 t + r and column n0 + 8 h (bias and routing weight applied as the paired stores do); after
// it, lane g holds chunk q = g: columns slab + 8 h .. + 7 of that row, one 16-byte store.
template <bool Scatter, int TileM, int Accumulators, class Params, class Rows, class ScatterData>
__device__ __forceinline__ void store_columns_sectors(float const (&acc)[Accumulators], Params const& p, int expert,
                                                      Rows const& rows, int n0, ScatterData const& scatter, int g) {
  int const slab = n0 - g;
  float bias[2] = {0.0f, 0.0f};
  if constexpr (Scatter) {
#pragma unroll
    for (int h = 0; h < 2; ++h) bias[h] = n0 + 8 * h < p.n ? bias_at(p, expert, n0 + 8 * h) : 0.0f;
  }
  int const ii = g >> 2, r = (g >> 1) & 1, h = g & 1;  // the chunk this lane stores
  int const column = slab + 8 * h;
  bool const column_ok = column + 8 <= p.n;
#pragma unroll
  for (int pair = 0; pair < TileM / 16; ++pair) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // word k: (ii, r) = (k >> 1, k & 1), h = 0 low and 1 high
      int const i = 2 * pair + (k >> 1), rr = k & 1;
      float low = acc[4 * i + rr], high = acc[4 * i + 2 + rr];
      if constexpr (Scatter) {
        int const m = 8 * i + 2 * rows.t + rr;
        float const scale = scatter.scale.at(8 * i / 32, m);
        low = (low + bias[0]) * scale;
        high = (high + bias[1]) * scale;
      }
      w[k] = pack_bf16x2(low, high);
    }
    transpose_8x8_halves(w, g);
    int const m = 8 * (2 * pair + ii) + 2 * rows.t + r;  // this lane's row of the tile
    uint16_t* row_out;
    if constexpr (Scatter) {
      row_out = p.out + static_cast<size_t>(scatter.dest.at(16 * pair / 32, m)) * p.out_cols + column;
    } else {
      row_out = p.out + static_cast<size_t>(rows.row0 + m) * p.out_cols + column;
    }
    if (m < rows.m_limit && column_ok) *reinterpret_cast<uint4*>(row_out) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

}  // namespace mxfp4
