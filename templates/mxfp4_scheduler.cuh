// Persistent tile scheduler over (expert, m-tile, n-tile), computed on the device from the
// routing (offsets or masked_m) so the launch needs no host synchronisation.
#pragma once

#include <cuda/std/cstdint>

namespace mxfp4 {

// Rows of x that expert e owns, clamped so that malformed routing can never index out of bounds.
struct ExpertRows {
  int start;
  int count;
};

template <class Params>
__device__ __forceinline__ int64_t load_routing(Params const& p, int i) {
  return p.rows_int64 ? reinterpret_cast<int64_t const*>(p.rows)[i]
                      : static_cast<int64_t>(reinterpret_cast<int32_t const*>(p.rows)[i]);
}

template <class Params>
__device__ __forceinline__ ExpertRows expert_rows(Params const& p, int e) {
  if (p.masked) {
    int64_t const m = load_routing(p, e);
    return {e * p.max_m, static_cast<int>(m < 0 ? 0 : (m > p.max_m ? p.max_m : m))};
  }
  int64_t begin = load_routing(p, e);
  int64_t end = load_routing(p, e + 1);
  begin = begin < 0 ? 0 : (begin > p.total_rows ? p.total_rows : begin);
  end = end < begin ? begin : (end > p.total_rows ? p.total_rows : end);
  return {static_cast<int>(begin), static_cast<int>(end - begin)};
}

// prefix[e] = m-tiles of experts 0..e-1, prefix[E] = all of them. Run by one full warp.
template <int TileM, class Params>
__device__ __forceinline__ void build_tile_prefix(Params const& p, int* prefix, int lane) {
  int running = 0;
  if (lane == 0) prefix[0] = 0;
  for (int base = 0; base < p.num_experts; base += 32) {
    int const e = base + lane;
    int tiles = e < p.num_experts ? (expert_rows(p, e).count + TileM - 1) / TileM : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {  // inclusive warp scan
      int const up = __shfl_up_sync(0xffffffffu, tiles, offset);
      if (lane >= offset) tiles += up;
    }
    if (e < p.num_experts) prefix[e + 1] = running + tiles;
    running += __shfl_sync(0xffffffffu, tiles, 31);
  }
}

struct Tile {
  int expert;
  int m_tile;
  int n_tile;
};

// The first weight row (N) that consumer thread `tid` holds of 64-row block `atom` of `tile`: WGMMA's accumulator
// layout gives warp w's lane (g = lane / 4) rows 16 w + g and 16 w + g + 8 of the block.
template <int TileN>
__device__ __forceinline__ int thread_weight_row(Tile const& tile, int atom, int tid) {
  return tile.n_tile * TileN + atom * kAtomN + 16 * (tid >> 5) + ((tid & 31) >> 2);
}

// One unit of a CTA's work: k-steps [k_begin, k_end) of tile `tile` (all of them: 0, k_tiles).
struct WorkUnit {
  int tile;
  int k_begin;
  int k_end;
};

// The stream-K split of `steps` k-steps over `grid` CTAs: CTA b takes [begin(b), begin(b + 1)), the
// first `extra` CTAs one step more than the others. 32-bit arithmetic (no 64-bit division, which
// compiles to a call that spills the accumulators); the launcher keeps steps + grid below 2^31.
struct StreamKSplit {
  int per_cta;  // steps / grid
  int extra;    // steps % grid

  __device__ __forceinline__ StreamKSplit(int steps, int grid) : per_cta(steps / grid), extra(steps % grid) {}

  __device__ __forceinline__ int begin(int cta) const { return cta * per_cta + min(cta, extra); }

  // The CTA whose range holds `step`.
  __device__ __forceinline__ int owner(int step) const {
    int const long_ranges = extra * (per_cta + 1);
    return step < long_ranges ? step / (per_cta + 1) : extra + (step - long_ranges) / per_cta;
  }
};

// A CTA's walk over the work, the same for its producer and its consumers.
//   tile by tile: CTA b takes tiles b, b + G, b + 2G, ... whole (G = gridDim.x);
//   stream-K:     the tiles x k_tiles k-steps, tile-major, are cut into G equal ranges (StreamKSplit):
//                 every CTA does the same number of k-steps (give or take one), so no wave is
//                 part-empty; a tile cut between CTAs is summed by the fix-up (mxfp4_stream_k.cuh).
template <bool StreamK>
struct WorkCursor {
  int next;  // the next tile (tile by tile) or k-step (stream-K)
  int end;

  __device__ __forceinline__ WorkCursor(int total_tiles, int k_tiles) {
    if constexpr (StreamK) {
      StreamKSplit const split(total_tiles * k_tiles, gridDim.x);
      next = split.begin(blockIdx.x);
      end = split.begin(blockIdx.x + 1);
    } else {
      next = blockIdx.x;
      end = total_tiles;
    }
  }

  __device__ __forceinline__ bool has_next() const { return next < end; }

  __device__ __forceinline__ bool fetch(int k_tiles, WorkUnit& unit) {
    if (next >= end) return false;
    if constexpr (StreamK) {
      int const tile = next / k_tiles;
      int const k_begin = next - tile * k_tiles;
      int const k_end = min(k_tiles, k_begin + (end - next));
      unit = {tile, k_begin, k_end};
      next += k_end - k_begin;
    } else {
      unit = {next, 0, k_tiles};
      next += gridDim.x;
    }
    return true;
  }
};

// Tiles are numbered n-tile fastest, so CTAs working at the same time share an x tile
// and walk over one expert's weights.
__device__ __forceinline__ Tile tile_coords(int const* prefix, int num_experts, int n_tiles, int index) {
  int const m_global = index / n_tiles;
  int lo = 0, hi = num_experts;  // find the last e with prefix[e] <= m_global
  while (hi - lo > 1) {
    int const mid = (lo + hi) >> 1;
    if (prefix[mid] <= m_global) lo = mid; else hi = mid;
  }
  return {lo, m_global - prefix[lo], index - m_global * n_tiles};
}

}  // namespace mxfp4
