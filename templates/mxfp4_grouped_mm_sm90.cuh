// SM90a MXFP4 grouped GEMM: out[rows of e] = x[rows of e] @ W_e^T, computed as
// out^T tile = W tile (WGMMA A, decoded into registers) . x tile^T (WGMMA B, TMA -> shared memory).
//
// A persistent grid (ctas_per_sm CTAs per SM) walks the work (mxfp4_scheduler.cuh: whole tiles, or
// stream-K shares of them, mxfp4_stream_k.cuh). One producer thread issues TMA loads of x (128-byte
// swizzled) and bulk copies of whole packed weight atoms into a `Stages`-deep ring guarded by
// full/empty mbarriers; it sits in a producer warpgroup (warpgroup 0, whose registers setmaxnreg
// hands to the consumers) or in a single producer warp after the consumers. Each consumer
// warpgroup owns `AtomsPerWarpgroup` blocks of 64 weight rows, loads its fragment bytes with one
// 16-byte shared load per 64 values of K, decodes them (mxfp4_decode.cuh) and issues wgmma.mma_async.
// (A diagnostic build, -DMXFP4_COPY_ONLY, leaves the decode and the WGMMAs out: mxfp4_copy_only.cuh; another,
// -DMXFP4_NO_DECODE, only the decode: mxfp4_no_decode.cuh; -DMXFP4_NO_EPILOGUE, the row scales and the stores:
// mxfp4_no_epilogue.cuh.)
//
// The W4A8 family (Cfg::Fp8) differs only where marked: x is e4m3 (128 values per swizzled row, so one
// TMA box covers two atoms of K), the weights are in the FP8-ready layout (mxfp4_decode_fp8.cuh) and
// each atom is two k32 FP8 WGMMAs instead of four k16 ones; the row scales are applied before the
// epilogue (mxfp4_row_scales.cuh), after a stream-K fix-up has summed a cut tile.
#pragma once

#include <cuda/std/cstdint>

#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/util/type_traits.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "mxfp4_copy_only.cuh"
#include "mxfp4_no_decode.cuh"
#include "mxfp4_no_epilogue.cuh"
#include "mxfp4_decode.cuh"
#include "mxfp4_decode_fp8.cuh"
#include "mxfp4_epilogue.cuh"
#include "mxfp4_coalesced_stores.cuh"
#include "mxfp4_sector_stores.cuh"
#include "mxfp4_line_stores.cuh"
#include "mxfp4_row_scales.cuh"
#include "mxfp4_scheduler.cuh"
#include "mxfp4_stream_k.cuh"
#include "mxfp4_wait_probe.cuh"

namespace mxfp4 {

// kAtomN, kAtomK, kAtomCodeBytes, kAtomBytes, kScaleWordsPerWarp and kLanesPerScaleWord: the packed
// layout's constants, rendered from mxfp4/format/layout.py into the generated source before this header.
constexpr int kSwizzleRowBytes = 128;  // one 128B-swizzled row: 64 bf16 (128 e4m3) of K

// cuTensorMapEncodeTiled's opaque 128-byte descriptor, passed by value in the kernel parameters.
struct alignas(64) TensorMap {
  uint64_t opaque[16];
};

template <int TileN_, int TileM_, int TileK_, int Stages_, int Warpgroups_, int ProducerRegs_, int ConsumerRegs_,
          Epilogue Epilogue_, bool ProducerWarp_, bool StreamK_, bool Fp8_ = false, int FragmentBuffers_ = 2,
          bool PingPong_ = false, int MmaRows_ = 0>
struct KernelConfig {
  static constexpr bool ProducerWarp = ProducerWarp_;  // a producer warp (no setmaxnreg), not a warpgroup
  static constexpr bool StreamK = StreamK_;
  static constexpr Epilogue EpilogueKind = Epilogue_;
  static constexpr bool Fp8 = Fp8_;  // W4A8: e4m3 x, FP8-ready weights, FP8 WGMMA k32
  // Register buffers of decoded A fragments per consumer warpgroup (TileConfig.fragment_buffers; rendered only when
  // not 2): FragmentBuffers - 1 WGMMA chunks stay in flight while the next one decodes (consume_stage).
  static constexpr int FragmentBuffers = FragmentBuffers_;
  // Ping-pong (TileConfig.pingpong; rendered only when true): each of the two consumer warpgroups owns whole tiles,
  // taking turns (the CTA's work units 0, 2, 4, ... and 1, 3, 5, ...), so that one's epilogue runs while the other
  // issues WGMMAs. Otherwise the consumer warpgroups split every tile's weight rows between them.
  static constexpr bool PingPong = PingPong_;
  // How the Store and ScaleScatter epilogues write a tile, and the line stores' staging areas before the ring, bytes
  // (TileConfig.store_path and line_stage_bytes; the rendered config hides these defaults when they differ).
  static constexpr StoreMode Stores = StoreMode::Paired;
  static constexpr int LineStageBytes = 0;
  static constexpr int SlotReaders = PingPong ? 1 : Warpgroups_;  // consumer warpgroups that read each ring slot
  static constexpr int TileN = TileN_;
  static constexpr int TileM = TileM_;
  static constexpr int TileK = TileK_;
  static constexpr int Stages = Stages_;
  static constexpr int Warpgroups = Warpgroups_;
  static constexpr int ProducerRegs = ProducerRegs_;
  static constexpr int ConsumerRegs = ConsumerRegs_;
  static constexpr int Threads = 128 * Warpgroups + (ProducerWarp ? 32 : 128);
  static constexpr int AtomsN = TileN / kAtomN;                // weight atoms along N per tile
  static constexpr int AtomsK = TileK / kAtomK;                // weight atoms along K per stage
  static constexpr int AtomsPerWarpgroup = PingPong ? AtomsN : AtomsN / Warpgroups;
  static constexpr int XElementBytes = Fp8 ? 1 : 2;
  static constexpr int XChunkK = kSwizzleRowBytes / XElementBytes;  // K of one swizzled row: 64 or 128
  static constexpr int AtomsPerXChunk = XChunkK / kAtomK;
  static constexpr int XChunks = TileK / XChunkK;               // TMA boxes of x per stage
  static constexpr int MmaSteps = Fp8 ? 2 : 4;                  // WGMMAs (k32 or k16) per 64-deep atom
  static constexpr int XStageBytes = TileM * TileK * XElementBytes;
  static constexpr int XChunkBytes = TileM * kSwizzleRowBytes;  // one 128-byte-wide column block of x
  static constexpr int WStageBytes = AtomsN * AtomsK * kAtomBytes;
  static constexpr int Accumulators = TileM / 2;               // per thread, per 64-row block
  // Narrow WGMMAs (TileConfig.mma_rows; rendered only when set): a tile issues WGMMAs of N = Parts x MmaRows, Parts
  // the smallest power of two whose rows cover the tile's valid rows (tile_parts), and its x arrives as that many
  // boxes of MmaRows rows; the config's MmaFor<Parts> is the WGMMA. Otherwise one width, TileM (Parts = 1).
  static constexpr int MmaRows = MmaRows_ ? MmaRows_ : TileM;
  static constexpr int MaxParts = TileM / MmaRows;
  static constexpr int XBoxBytes = MmaRows * kSwizzleRowBytes;  // one TMA box of x: MmaRows rows of 128 bytes
  static_assert(TileN % (kAtomN * (PingPong ? 1 : Warpgroups)) == 0, "tile_n must split into 64-row blocks per warpgroup");
  static_assert(!PingPong || (Warpgroups == 2 && !StreamK), "ping-pong: two consumer warpgroups, whole tiles");
  static_assert(TileM % 8 == 0 && TileM >= 8 && TileM <= 256, "tile_m is WGMMA's N");
  static_assert(XChunkBytes % 1024 == 0, "128B-swizzled x chunks must stay 1024-byte aligned");
  static_assert(TileK % XChunkK == 0, "a stage holds whole 128-byte rows of x");
  static_assert(FragmentBuffers >= 2, "the decode of chunk c + 1 needs a buffer that chunk c's WGMMAs do not read");
  static_assert(AtomsK >= FragmentBuffers - 1, "a full stage releases the previous stage's slot (consume_stage)");
  static_assert(TileM % MmaRows == 0 && (MaxParts & (MaxParts - 1)) == 0 && MmaRows % 8 == 0,
                "narrow WGMMAs: TileM is a power-of-two multiple of MmaRows, a multiple of 8");
  static_assert(MaxParts == 1 || (!StreamK && !PingPong), "narrow WGMMAs: not with stream-K or ping-pong");
};

// The WGMMA parts a tile of `valid` rows (1 .. TileM) issues: the smallest power of two p with p x MmaRows >= valid
// (1 without narrow WGMMAs). The producer and the consumers compute it alike from the expert's rows.
template <class Cfg>
__device__ __forceinline__ int tile_parts(int valid) {
  if constexpr (Cfg::MaxParts == 1) {
    return 1;
  } else {
    int parts = 1;
#pragma unroll
    for (int p = 1; p < Cfg::MaxParts; p *= 2)
      if (valid > p * Cfg::MmaRows) parts = 2 * p;
    return parts;
  }
}

// The 128B-swizzle K-major shared-memory descriptor of an x chunk (rows of 128 bytes, 8-row
// swizzle atoms 1024 bytes apart), advanced to WGMMA step `step` (32 bytes each: k16 bf16 or k32 e4m3).
__device__ __forceinline__ uint64_t x_descriptor(void const* chunk, int step) {
  cute::GmmaDescriptor desc;
  uint32_t const address = cute::cast_smem_ptr_to_uint(chunk) + 32u * step;
  desc.bitfield.start_address_ = static_cast<uint16_t>(address >> 4);
  desc.bitfield.leading_byte_offset_ = 1;  // unused by swizzled K-major layouts
  desc.bitfield.stride_byte_offset_ = 1024 >> 4;
  desc.bitfield.base_offset_ = 0;
  desc.bitfield.layout_type_ = static_cast<uint8_t>(cute::SM90::GMMA::LayoutType::B128);
  return desc.desc_;
}

// The descriptor `steps` WGMMA steps further into the same rows: the start address (bits 0-13, in 16-byte units)
// moves by 2 per 32-byte step. Shared addresses stay below 2^18, so the field cannot carry into the next one.
__device__ __forceinline__ uint64_t advance_descriptor(uint64_t desc, int steps) {
  return desc + 2u * static_cast<uint32_t>(steps);
}

template <class Mma, int N, size_t... I>
__device__ __forceinline__ void wgmma_rs(uint32_t const (&a)[4], uint64_t desc, float (&d)[N],
                                         cute::index_sequence<I...>) {
  Mma::fma(a[0], a[1], a[2], a[3], desc, d[I]..., cute::SM90::GMMA::ScaleOut::One);
}

template <class Cfg>
struct SharedStorage {
  uint8_t* x;         // [Stages][AtomsK][TileM x 128 B], 128B-swizzled by TMA
  uint8_t* w;         // [Stages][AtomsN][AtomsK][kAtomBytes]
  uint64_t* full;     // [Stages]: TMA bytes landed
  uint64_t* empty;    // [Stages]: consumers done with the slot
  int* tile_prefix;   // [num_experts + 1]
  int* last_share;    // [4]: per consumer warpgroup, whether its stream-K share completed the tile
  uint8_t* line_stage;  // the line stores' staging areas (mxfp4_line_stores.cuh; Cfg::LineStageBytes, else none)

  __device__ explicit SharedStorage(uint8_t* raw) {
    // Offset `raw` itself (no integer round trip) so that the compiler keeps every pointer in the
    // shared state space and emits LDS rather than generic loads.
    uint8_t* base = raw + ((1024u - (cute::cast_smem_ptr_to_uint(raw) & 1023u)) & 1023u);
    constexpr int StageBytes = Cfg::LineStageBytes + diagnostic_stage_bytes();
    static_assert(StageBytes % 1024 == 0, "the ring's TMA boxes stay 1024-byte aligned");
    line_stage = base;
    base += StageBytes;
    x = base;
    w = x + Cfg::Stages * Cfg::XStageBytes;
    full = reinterpret_cast<uint64_t*>(w + Cfg::Stages * Cfg::WStageBytes);
    empty = full + Cfg::Stages;
    last_share = reinterpret_cast<int*>(empty + Cfg::Stages);
    tile_prefix = last_share + 4;
  }
};

// Ring position shared by producer and consumers: slot and the parity of its current use.
struct RingPosition {
  int slot = 0;
  uint32_t phase = 0;
  template <int Stages>
  __device__ __forceinline__ void advance() {
    if (++slot == Stages) { slot = 0; phase ^= 1u; }
  }
  // Past `steps` stages that another consumer warpgroup reads (ping-pong).
  template <int Stages>
  __device__ __forceinline__ void advance_by(int steps) {
    int const position = slot + steps;
    slot = position % Stages;
    phase ^= static_cast<uint32_t>(position / Stages) & 1u;
  }
};

template <class Cfg, class Params>
__device__ __forceinline__ void produce(Params const& p, SharedStorage<Cfg> const& s, int n_tiles, int total_tiles) {
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  RingPosition ring;
  WaitProbe probe(true);
  int const k_tiles = (p.k_atoms + Cfg::AtomsK - 1) / Cfg::AtomsK;
  WorkCursor<Cfg::StreamK> work(total_tiles, k_tiles);
  WorkUnit unit;
  while (work.fetch(k_tiles, unit)) {
    Tile const tile = tile_coords(s.tile_prefix, p.num_experts, n_tiles, unit.tile);
    ExpertRows const rows = expert_rows(p, tile.expert);
    int const row0 = rows.start + tile.m_tile * Cfg::TileM;
    int const parts = tile_parts<Cfg>(rows.count - tile.m_tile * Cfg::TileM);  // x boxes per chunk
    int const n_atom0 = tile.n_tile * Cfg::AtomsN;
    int const n_atoms_here = min(Cfg::AtomsN, p.n_atoms - n_atom0);
    uint8_t const* w_expert = p.w + (static_cast<size_t>(tile.expert) * p.n_atoms + n_atom0) * p.k_atoms * kAtomBytes;
    for (int kt = unit.k_begin; kt < unit.k_end; ++kt) {
      int const k_atom0 = kt * Cfg::AtomsK;
      int const k_atoms_here = min(Cfg::AtomsK, p.k_atoms - k_atom0);
      long long const waited_from = probe.now();
      Barrier::wait(&s.empty[ring.slot], ring.phase ^ 1u);
      probe.template add_since<kProbeProducerEmpty>(waited_from);
      probe.template count<kProbeProducerStages>();
      // Out-of-range x boxes are zero-filled by TMA and still count their full size.
      Barrier::arrive_and_expect_tx(&s.full[ring.slot],
                                    Cfg::XChunks * parts * Cfg::XBoxBytes + n_atoms_here * k_atoms_here * kAtomBytes);
      uint8_t* x_slot = s.x + ring.slot * Cfg::XStageBytes;
#pragma unroll
      for (int c = 0; c < Cfg::XChunks; ++c) {
        // The chunk's first `parts` boxes of MmaRows rows, stacked as one box of parts x MmaRows rows would be (the
        // 128B swizzle repeats every 8 rows, so a box at a multiple of 8 rows keeps the pattern).
        for (int b = 0; b < parts; ++b)
          cute::SM90_TMA_LOAD_2D::copy(&p.x_map, &s.full[ring.slot],
                                       static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL),
                                       x_slot + c * Cfg::XChunkBytes + b * Cfg::XBoxBytes,
                                       k_atom0 * kAtomK + c * Cfg::XChunkK, row0 + b * Cfg::MmaRows);
      }
      uint8_t* w_slot = s.w + ring.slot * Cfg::WStageBytes;
      for (int a = 0; a < n_atoms_here; ++a) {
        cute::SM90_BULK_COPY_G2S::copy(w_expert + (static_cast<size_t>(a) * p.k_atoms + k_atom0) * kAtomBytes,
                                       &s.full[ring.slot], w_slot + a * Cfg::AtomsK * kAtomBytes,
                                       k_atoms_here * kAtomBytes);
      }
      ring.advance<Cfg::Stages>();
    }
  }
  probe.template flush<kProbeProducerCycles>();
}

template <class Cfg>
struct ConsumerState {
  using Mma = typename Cfg::Mma;
  static constexpr int A = Cfg::AtomsPerWarpgroup;
  float acc[A][Cfg::Accumulators];
  uint32_t frag[Cfg::FragmentBuffers][A][Cfg::MmaSteps][4];  // [register buffer][atom][WGMMA step][A register]
  int parts = 1;  // the tile's WGMMA width in MmaRows (tile_parts), warp-uniform

  __device__ __forceinline__ void fence_accumulators() {
#pragma unroll
    for (int a = 0; a < A; ++a)
#pragma unroll
      for (int i = 0; i < Cfg::Accumulators; ++i) cute::warpgroup_fence_operand(acc[a][i]);
  }

  template <int Buf>
  __device__ __forceinline__ void fence_fragments() {
#pragma unroll
    for (int a = 0; a < A; ++a)
#pragma unroll
      for (int s = 0; s < Cfg::MmaSteps; ++s)
#pragma unroll
        for (int r = 0; r < 4; ++r) cute::warpgroup_fence_operand(frag[Buf][a][s][r]);
  }

  // Decode one 64-deep chunk of this warpgroup's atoms from the w slot into register buffer Buf. Every atom's
  // bytes are loaded first and the scale check is one warp-wide vote for the whole chunk, so the fast path is one
  // basic block over all atoms (no divergent branch per atom that would keep ptxas from interleaving their
  // independent decode chains).
  // With more than two fragment buffers there is no vote: where two paths define the buffer that the next WGMMAs
  // read while two chunks are in flight, ptxas serializes every WGMMA of the kernel (C7511, "insufficient register
  // resources for the wgmma pipeline"), so the bf16 decode always takes the general path (two multiplies per
  // register instead of one).
  template <int Buf>
  __device__ __forceinline__ void decode_chunk(uint8_t const* w_chunk, int tid) {
    int const scale_word = (tid >> 5) * kScaleWordsPerWarp + (tid & 31) / kLanesPerScaleWord;
    uint4 codes[A];
    uint32_t scales[A];
    uint32_t any_scale = 0;
#pragma unroll
    for (int a = 0; a < A; ++a) {
      uint8_t const* atom = w_chunk + a * Cfg::AtomsK * kAtomBytes;
      codes[a] = *reinterpret_cast<uint4 const*>(atom + tid * 16);
      scales[a] = *reinterpret_cast<uint32_t const*>(atom + kAtomCodeBytes + scale_word * 4);
      any_scale |= scales[a];
    }
    if constexpr (no_decode_build()) {  // diagnostic (mxfp4_no_decode.cuh): the code words as the fragments
      raw_fragments(codes, frag[Buf]);
    } else if constexpr (Cfg::Fp8) {  // the FP8-ready layout: block offsets, not scales
#pragma unroll
      for (int a = 0; a < A; ++a) decode_atom_fp8(codes[a], scales[a], frag[Buf][a]);
    } else if (Cfg::FragmentBuffers == 2 && !__any_sync(0xffffffffu, (any_scale & 0x80808080u) != 0u)) {
      // Every scale of the warp's chunk below 128 (what real checkpoints hold): one multiply per register.
#pragma unroll
      for (int a = 0; a < A; ++a) {
        uint32_t factor[4];
        e8m0_factors_below_128(scales[a], factor);
        decode_k16(codes[a].x, factor[0], factor[1], frag[Buf][a][0]);
        decode_k16(codes[a].y, factor[0], factor[1], frag[Buf][a][1]);
        decode_k16(codes[a].z, factor[2], factor[3], frag[Buf][a][2]);
        decode_k16(codes[a].w, factor[2], factor[3], frag[Buf][a][3]);
      }
    } else {
#pragma unroll
      for (int a = 0; a < A; ++a) {
        uint32_t const sc = scales[a];
        ScalePair const block0[2] = {e8m0_scale_factors(sc & 0xFFu), e8m0_scale_factors((sc >> 8) & 0xFFu)};
        ScalePair const block1[2] = {e8m0_scale_factors((sc >> 16) & 0xFFu), e8m0_scale_factors(sc >> 24)};
        decode_k16(codes[a].x, block0, frag[Buf][a][0]);
        decode_k16(codes[a].y, block0, frag[Buf][a][1]);
        decode_k16(codes[a].z, block1, frag[Buf][a][2]);
        decode_k16(codes[a].w, block1, frag[Buf][a][3]);
      }
    }
  }

  // One atom's WGMMAs; its x starts `step0` WGMMA steps into the swizzled rows of `x_chunk`.
  template <int Buf>
  __device__ __forceinline__ void issue_chunk(uint8_t const* x_chunk, int step0) {
    fence_fragments<Buf>();
    fence_accumulators();
    uint64_t const desc0 = x_descriptor(x_chunk, step0);  // once per chunk; the steps add to its address field
    cute::warpgroup_arrive();
    issue_parts<Buf, 1>(desc0);
    cute::warpgroup_commit_batch();
    fence_accumulators();
  }

  // The WGMMAs as wide as the tile's valid rows need: N = parts x MmaRows, writing the first parts x MmaRows / 2
  // accumulators of each atom; the whole tile's Mma at P = MaxParts (always, without narrow WGMMAs). Only the
  // widths below MaxParts are instantiated: a wider one would not match the accumulators.
  template <int Buf, int P>
  __device__ __forceinline__ void issue_parts(uint64_t desc0) {
    if constexpr (P >= Cfg::MaxParts) {
      issue_steps<Buf, Mma, Cfg::Accumulators>(desc0);
    } else if (parts == P) {
      issue_steps<Buf, typename Cfg::template MmaFor<P>, P * Cfg::MmaRows / 2>(desc0);
    } else {
      issue_parts<Buf, 2 * P>(desc0);
    }
  }

  template <int Buf, class Op, int Written>
  __device__ __forceinline__ void issue_steps(uint64_t desc0) {
#pragma unroll
    for (int step = 0; step < Cfg::MmaSteps; ++step) {
      uint64_t const desc = advance_descriptor(desc0, step);
#pragma unroll
      for (int a = 0; a < A; ++a)
        wgmma_rs<Op>(frag[Buf][a][step], desc, acc[a], cute::make_index_sequence<Written>{});
    }
  }
};

// A consumer warp hands a ring slot back to the producer once its lanes are done with it: one arrival per warp on
// the slot's empty barrier (initialized to 4 x Warpgroups arrivals).
__device__ __forceinline__ void release_slot(uint64_t* empty, int tid) {
  __syncwarp();
  if ((tid & 31) == 0) cutlass::arch::ClusterBarrier::arrive(empty);
}

// Decode chunk `c` of a stage into register buffer `buf` and issue its WGMMAs. `buf` is a run-time value that the
// unrolled loop of consume_stage folds to a constant; the buffer must be a template argument (registers are not
// indexable), so this picks the instantiation.
template <int Buf, class Cfg>
__device__ __forceinline__ void decode_and_issue(ConsumerState<Cfg>& st, int buf, uint8_t const* w_chunk,
                                                 uint8_t const* x_chunk, int step0, int tid) {
  if constexpr (Buf > 0) {
    if (buf != Buf) {
      decode_and_issue<Buf - 1>(st, buf, w_chunk, x_chunk, step0, tid);
      return;
    }
  }
  st.template decode_chunk<Buf>(w_chunk, tid);
  st.template issue_chunk<Buf>(x_chunk, step0);
}

// Consume one pipeline stage of `chunks` chunks (64 deep each). With F = Cfg::FragmentBuffers, chunk c uses register
// buffer (Buf0 + c) mod F, Buf0 being the stage's first chunk index in the work unit mod F, so the buffers rotate
// across the whole k loop.
// Invariant: a buffer is rewritten only after the wgmma that read it, F chunks back, is complete. After issuing
// chunk c, wgmma.wait_group<F - 1> leaves at most chunks c, c - 1, ..., c - F + 2 in flight, so chunk c - F + 1,
// whose buffer chunk c + 1 decodes into, is done.
// Slot release (release_previous): the previous stage's last chunk is chunk -1 of this stage, known complete after
// the wait that follows chunk F - 2 (TileConfig.validate: AtomsK >= F - 1, so a full stage reaches it); the previous
// slot is handed back there, one arrival per warp. With F = 2 that is chunk 0, which every stage has; with F > 2
// only full stages get release_previous, and consume() releases for the others (see there).
template <int Buf0, class Cfg>
__device__ __forceinline__ void consume_stage(ConsumerState<Cfg>& st, uint8_t const* x_slot, uint8_t const* w_slot,
                                              int chunks, int tid, bool release_previous,
                                              uint64_t* previous_empty, WaitProbe& probe) {
  constexpr int F = Cfg::FragmentBuffers;
#pragma unroll
  for (int c = 0; c < Cfg::AtomsK; ++c) {
    if (c < chunks) {
      uint8_t const* x_chunk = x_slot + (c / Cfg::AtomsPerXChunk) * Cfg::XChunkBytes;
      int const step0 = (c % Cfg::AtomsPerXChunk) * Cfg::MmaSteps;
      decode_and_issue<F - 1>(st, (Buf0 + c) % F, w_slot + c * kAtomBytes, x_chunk, step0, tid);
      long long const waited_from = probe.now();
      cute::warpgroup_wait<F - 1>();
      probe.template add_since<kProbeConsumerMma>(waited_from);
      if (c == F - 2 && release_previous) {
        release_slot(previous_empty, tid);  // the last chunk of the previous stage has completed
      }
    }
  }
}

// consume_stage for the stage whose first chunk goes to register buffer `first` (a run-time value in 0..Buf; a
// constant folds this to one instantiation).
template <int Buf, class Cfg>
__device__ __forceinline__ void consume_stage_from(int first, ConsumerState<Cfg>& st, uint8_t const* x_slot,
                                                   uint8_t const* w_slot, int chunks, int tid, bool release_previous,
                                                   uint64_t* previous_empty, WaitProbe& probe) {
  if constexpr (Buf > 0) {
    if (first == Buf) {
      consume_stage<Buf>(st, x_slot, w_slot, chunks, tid, release_previous, previous_empty, probe);
      return;
    }
    consume_stage_from<Buf - 1>(first, st, x_slot, w_slot, chunks, tid, release_previous, previous_empty, probe);
  } else {
    consume_stage<0>(st, x_slot, w_slot, chunks, tid, release_previous, previous_empty, probe);
  }
}

// The register buffer of the first chunk of the work unit's stage `stage` (0, 1, ...): its chunk index
// stage x AtomsK mod F. Every stage before the K tail is full, so this counts every chunk before it.
template <class Cfg>
__device__ __forceinline__ int first_buffer(int stage) {
  constexpr unsigned step = Cfg::AtomsK % Cfg::FragmentBuffers;
  if constexpr (step == 0) {
    return 0;
  } else {
    return static_cast<int>(static_cast<unsigned>(stage) * step % Cfg::FragmentBuffers);
  }
}

// F > 2: the stages of one period of the buffer rotation: from a stage that starts on buffer 0 to the next one
// (P = F / gcd(AtomsK, F) full stages; 1 where AtomsK is a multiple of F).
template <class Cfg>
__host__ __device__ constexpr int rotation_period() {
  int stages = 1;
  while (stages * Cfg::AtomsK % Cfg::FragmentBuffers != 0) ++stages;
  return stages;
}

// One period of full stages, I .. P - 1, straight; stage I of the period starts on buffer I x AtomsK mod F, a
// compile-time constant. `kt` is the next stage, `begin` the work unit's first.
template <class Cfg, int I = 0, class Stage>
__device__ __forceinline__ void consume_period(Stage& stage, int& kt, int begin) {
  if constexpr (I < rotation_period<Cfg>()) {
    stage(I * Cfg::AtomsK % Cfg::FragmentBuffers, kt, Cfg::AtomsK, kt > begin);
    ++kt;
    consume_period<Cfg, I + 1>(stage, kt, begin);
  }
}

// store_tile's common case (paired_stores_fit): the values of two adjacent output columns go out as one 4-byte store
// after one shuffle (pair_columns), about 3 instructions per value instead of 15. In each helper below,
// acc[4 i + r] holds weight row n0 + 8 (r >> 1) and tile row 8 i + 2 t + (r & 1); after the exchange a lane stores
// tile row 8 i + 2 t + odd at the column pair that starts at (its column) - odd.

// Where a tile's rows sit (the tile's first row, its valid rows) and which lane this is in the pair exchange.
struct PairedRows {
  int row0;     // the tile's first row of x (and of out, but for ScaleScatter)
  int m_limit;  // valid rows in the tile
  int t;        // tid & 3: this thread holds tile rows 8 i + 2 t and + 1
  int odd;      // the thread's weight row is odd: after the exchange it stores row 8 i + 2 t + 1
};

// ScaleScatter: each tile row's routing weight and destination (TileRowValues: loads per row and value would all be
// hoisted ahead of the stores, and with two atoms per warpgroup their registers would not fit beside the
// accumulators).
template <int TileM>
struct ScatterRows {
  TileRowValues<TileM, float> scale;
  TileRowValues<TileM, int> dest;

  template <class Params>
  __device__ __forceinline__ void load(Params const& p, PairedRows const& rows, int lane) {
    scale.load(p.row_scale + rows.row0, rows.m_limit, lane, 0.0f);
    dest.load(p.row_dest + rows.row0, rows.m_limit, lane, 0);
  }
};

// SwiGLU: the thread holds a channel's gate (weight row n0) and up (n0 + 8) of two tile rows; one output column each,
// bf16 (a 4-byte store per column pair) or e4m3 (E4M3: a 2-byte store; swiglu_e4m3_output).
template <class Cfg, bool E4M3, class Params>
__device__ __forceinline__ void store_swiglu_paired(float const (&acc)[Cfg::Accumulators], Params const& p, int expert,
                                                    PairedRows const& rows, int n0) {
  int const channel = (n0 >> 4) * 8 + (n0 & 7);  // even for even g: the pair is (channel - odd, + 1)
  bool const in_range = n0 < p.n;
  float const gate_bias = in_range ? bias_at(p, expert, 2 * channel) : 0.0f;  // transformers' interleaved order
  float const up_bias = in_range ? bias_at(p, expert, 2 * channel + 1) : 0.0f;
  using Element = cute::conditional_t<E4M3, uint8_t, uint16_t>;
  size_t const first = static_cast<size_t>(rows.row0 + 2 * rows.t + rows.odd) * p.out_cols + (channel - rows.odd);
  Element* const out = reinterpret_cast<Element*>(p.out) + first;
#pragma unroll
  for (int i = 0; i < Cfg::TileM / 8; ++i) {
    float y[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
      y[r] = gpt_oss_swiglu(acc[4 * i + r] + gate_bias, acc[4 * i + r + 2] + up_bias, p.alpha, p.limit);
    bool const store = 8 * i + 2 * rows.t + rows.odd < rows.m_limit && in_range;
    Element* const at = out + static_cast<size_t>(8 * i) * p.out_cols;
    if constexpr (E4M3) {
      uint16_t const pair =
          pair_columns_bytes(pack_e4m3x2(y[0] * p.out_scale_inverse, y[1] * p.out_scale_inverse), rows.odd);
      if (store) *reinterpret_cast<uint16_t*>(at) = pair;
    } else {
      uint32_t const pair = pair_columns(pack_bf16x2(y[0], y[1]), rows.odd);
      if (store) *reinterpret_cast<uint32_t*>(at) = pair;
    }
  }
}

// SwiGLU's e4m3 output: the tile's rows' scale (out_scale for every row), written once per row, by the warpgroup that
// holds the first atom of the row's n-tile 0.
template <class Cfg, class Params>
__device__ __forceinline__ void store_swiglu_row_scales(Params const& p, Tile const& tile, ExpertRows const& rows,
                                                        int first_atom, int tid) {
  if (tile.n_tile != 0 || first_atom != 0) return;
  int const m_base = tile.m_tile * Cfg::TileM;
  for (int m = tid; m < Cfg::TileM && m < rows.count - m_base; m += 128)
    p.out_row_scale[rows.start + m_base + m] = p.out_scale;
}

// The candidate SwiGLU line stores (mxfp4_line_stores.cuh; -DMXFP4_SWIGLU_LINES, not shipped): the paired words of
// store_swiglu_paired staged 32 rows at a time (row 8 j + 2 t + odd, channel 8 warp + g - odd of the block), then
// stored as 64-byte rows.
template <class Cfg, class Params>
__device__ __forceinline__ void store_swiglu_lines(float const (&acc)[Cfg::Accumulators], Params const& p, int expert,
                                                   PairedRows const& rows, int n0, uint8_t* stage, int consumer,
                                                   int tid) {
  static_assert(Cfg::LineStageBytes + diagnostic_stage_bytes() >= Cfg::Warpgroups * kLineStageBytes,
                "the launch reserves less than the warpgroups stage");
  int const g = (tid & 31) >> 2, warp = tid >> 5;
  int const channel = (n0 >> 4) * 8 + (n0 & 7);
  int const channel0 = channel - g - 8 * warp;  // the block's first channel (n0 = block + 16 warp + g)
  bool const in_range = n0 < p.n;
  float const gate_bias = in_range ? bias_at(p, expert, 2 * channel) : 0.0f;  // transformers' interleaved order
  float const up_bias = in_range ? bias_at(p, expert, 2 * channel + 1) : 0.0f;
  // Bank of a write: 36 row + 4 warp + (g - odd) / 2 mod 32 = 8 t + 4 odd + (g - odd) / 2 + const: 32 banks.
  uint8_t* const word = stage + (2 * rows.t + rows.odd) * kLineStagePitch + 2 * (8 * warp + g - rows.odd);
#pragma unroll
  for (int c = 0; c < Cfg::TileM / kLineStageRows; ++c) {
#pragma unroll
    for (int j = 0; j < kLineStageRows / 8; ++j) {
      int const i = 4 * c + j;
      float y[2];
#pragma unroll
      for (int r = 0; r < 2; ++r)
        y[r] = gpt_oss_swiglu(acc[4 * i + r] + gate_bias, acc[4 * i + r + 2] + up_bias, p.alpha, p.limit);
      *reinterpret_cast<uint32_t*>(word + 8 * j * kLineStagePitch) = pair_columns(pack_bf16x2(y[0], y[1]), rows.odd);
    }
    warpgroup_sync<Cfg::Warpgroups>(consumer);  // the block's rows staged
    store_staged_half_rows(p, stage, kLineStageRows * c, rows.m_limit, rows.row0, channel0, tid);
    warpgroup_sync<Cfg::Warpgroups>(consumer);  // read back before the next rows overwrite them
  }
}

// ScaleScatter's bias of weight rows n0 and n0 + 8 (0 past N, and for Store, which has none).
template <class Cfg, class Params>
__device__ __forceinline__ void column_bias(Params const& p, int expert, int n0, float (&bias)[2]) {
  bias[0] = bias[1] = 0.0f;
  if constexpr (Cfg::EpilogueKind == Epilogue::ScaleScatter) {
#pragma unroll
    for (int h = 0; h < 2; ++h) bias[h] = n0 + 8 * h < p.n ? bias_at(p, expert, n0 + 8 * h) : 0.0f;
  }
}

// Row group i's two paired words, after the exchange: h = 0, 1 holds tile row 8 i + 2 t + odd at the column pair that
// starts at n0 - odd + 8 h (ScaleScatter: bias and routing weight applied).
template <class Cfg>
__device__ __forceinline__ void column_pair_words(float const (&acc)[Cfg::Accumulators], int i, PairedRows const& rows,
                                                  float const (&bias)[2], ScatterRows<Cfg::TileM> const& scatter,
                                                  uint32_t (&pair)[2]) {
  if constexpr (Cfg::EpilogueKind == Epilogue::ScaleScatter) {
    int const m = 8 * i + 2 * rows.t;  // this thread's rows m and m + 1; after the exchange, m + odd
    float const scale[2] = {scatter.scale.at(8 * i / 32, m), scatter.scale.at(8 * i / 32, m + 1)};
#pragma unroll
    for (int h = 0; h < 2; ++h)
      pair[h] = pair_columns(pack_bf16x2((acc[4 * i + 2 * h] + bias[h]) * scale[0],
                                         (acc[4 * i + 2 * h + 1] + bias[h]) * scale[1]), rows.odd);
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      pair[h] = pair_columns(pack_bf16x2(acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1]), rows.odd);
  }
}

// Store and ScaleScatter: the thread holds weight rows n0 and n0 + 8 of two tile rows; two output columns each.
template <class Cfg, class Params>
__device__ __forceinline__ void store_columns_paired(float const (&acc)[Cfg::Accumulators], Params const& p, int expert,
                                                     PairedRows const& rows, int n0,
                                                     ScatterRows<Cfg::TileM> const& scatter) {
  constexpr bool Scatter = Cfg::EpilogueKind == Epilogue::ScaleScatter;
  int const column = n0 - rows.odd;
  bool const column_ok[2] = {column < p.n, column + 8 < p.n};  // p.n is even: a pair is in or out whole
  float bias[2];
  column_bias<Cfg>(p, expert, n0, bias);
  // Store: this lane's tile row 2 t + odd, 8 rows further per i.
  uint16_t* out = p.out + static_cast<size_t>(rows.row0 + 2 * rows.t + rows.odd) * p.out_cols + column;
  size_t const eight_rows = static_cast<size_t>(p.out_cols) * 8;
#pragma unroll
  for (int i = 0; i < Cfg::TileM / 8; ++i, out += eight_rows) {
    int const m = 8 * i + 2 * rows.t;  // this thread's rows m and m + 1; after the exchange, m + odd
    uint32_t pair[2];
    column_pair_words<Cfg>(acc, i, rows, bias, scatter, pair);
    bool const row_ok = m + rows.odd < rows.m_limit;
    uint16_t* row_out = out;
    if constexpr (Scatter) {  // the row's place in token order
      row_out = p.out + static_cast<size_t>(scatter.dest.at(8 * i / 32, m + rows.odd)) * p.out_cols + column;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (row_ok && column_ok[h]) *reinterpret_cast<uint32_t*>(row_out + 8 * h) = pair[h];
  }
}

// The sector stores (mxfp4_sector_stores.cuh; StoreMode::Sectors), Store and ScaleScatter:
// the thread's 16-column slab (weight rows slab .. slab + 15 of the tile, n0 = slab + g) of tile rows 16 p .. 16 p +
// 15, p = 0 .. TileM / 16 - 1. Before the transpose, element q = 4 ii + 2 r + h of the thread is its accumulator for
// tile row 8 (2 p + ii) + 2 t + r and column n0 + 8 h (bias and routing weight applied as the paired stores do); after
// it, lane g holds chunk q = g: columns slab + 8 h .. + 7 of that row, one 16-byte store.
template <class Cfg, class Params>
__device__ __forceinline__ void store_columns_sectors(float const (&acc)[Cfg::Accumulators], Params const& p, int expert,
                                                      PairedRows const& rows, int n0,
                                                      ScatterRows<Cfg::TileM> const& scatter, int g) {
  constexpr bool Scatter = Cfg::EpilogueKind == Epilogue::ScaleScatter;
  int const slab = n0 - g;
  float bias[2];
  column_bias<Cfg>(p, expert, n0, bias);
  int const ii = g >> 2, r = (g >> 1) & 1, h = g & 1;  // the chunk this lane stores
  int const column = slab + 8 * h;
  bool const column_ok = column + 8 <= p.n;
#pragma unroll
  for (int pair = 0; pair < Cfg::TileM / 16; ++pair) {
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

// Store and ScaleScatter through the warpgroup's staging area (the line stores, mxfp4_line_stores.cuh): rows
// 32 c .. 32 c + 31 of the block staged as the paired words, then stored one 128-byte line per 8 lanes.
template <class Cfg, class Params>
__device__ __forceinline__ void store_columns_lines(float const (&acc)[Cfg::Accumulators], Params const& p, int expert,
                                                    PairedRows const& rows, int n0,
                                                    ScatterRows<Cfg::TileM> const& scatter, uint8_t* stage,
                                                    int consumer, int tid) {
  constexpr bool Scatter = Cfg::EpilogueKind == Epilogue::ScaleScatter;
  static_assert(Cfg::LineStageBytes >= Cfg::Warpgroups * kLineStageBytes, "TileConfig.line_stage_bytes reserves less");
  int const g = (tid & 31) >> 2, warp = tid >> 5;
  int const col0 = n0 - g - 16 * warp;  // the 64-column block's first column
  float bias[2];
  column_bias<Cfg>(p, expert, n0, bias);
  // This thread's staged words: block row 2 t + odd (8 rows further per i), block columns 16 warp + g - odd + 8 h.
  // Bank (4-byte word) of a write: 36 row + 8 warp + 4 h + g / 2 mod 32, i.e. 4 (2 t + odd) + g / 2 + const: the
  // 32 lanes hit 32 banks.
  uint8_t* const word = stage + (2 * rows.t + rows.odd) * kLineStagePitch + 2 * (16 * warp + g - rows.odd);
#pragma unroll
  for (int c = 0; c < Cfg::TileM / kLineStageRows; ++c) {
#pragma unroll
    for (int j = 0; j < kLineStageRows / 8; ++j) {
      uint32_t pair[2];
      column_pair_words<Cfg>(acc, 4 * c + j, rows, bias, scatter, pair);
#pragma unroll
      for (int h = 0; h < 2; ++h) *reinterpret_cast<uint32_t*>(word + 8 * j * kLineStagePitch + 16 * h) = pair[h];
    }
    warpgroup_sync<Cfg::Warpgroups>(consumer);  // the block's rows staged (the warpgroup's own barrier, as stream-K's)
    static_assert(kLineStageRows == 32, "a staged block is one word of the tile's row values");
    store_staged_rows(p, stage, kLineStageRows * c, rows.m_limit, col0, tid, [&](int row) {
      int const m = kLineStageRows * c + row;
      if constexpr (Scatter) return scatter.dest.at(c, m);  // word c: a constant once the loop is unrolled
      else return rows.row0 + m;
    });
    warpgroup_sync<Cfg::Warpgroups>(consumer);  // read back before the next rows overwrite them
  }
}

// The tile's stores when paired_stores_fit (Paired) or sixteen_byte_stores_fit (Sectors, Lines: Store and
// ScaleScatter; SwiGLU's candidate Lines when swiglu_lines_fit).
template <StoreMode Mode, class Cfg, class Params>
__device__ __forceinline__ void store_tile_paired(ConsumerState<Cfg> const& st, Params const& p, Tile const& tile,
                                                  ExpertRows const& rows, int first_atom, int tid,
                                                  uint8_t* stage = nullptr, int consumer = 0) {
  int const g = (tid & 31) >> 2;
  int const m_base = tile.m_tile * Cfg::TileM;
  PairedRows const paired{rows.start + m_base, rows.count - m_base, tid & 3, g & 1};
  ScatterRows<Cfg::TileM> scatter;
  constexpr bool Scatter = Cfg::EpilogueKind == Epilogue::ScaleScatter;
  if constexpr (Scatter) scatter.load(p, paired, tid & 31);
#pragma unroll
  for (int a = 0; a < Cfg::AtomsPerWarpgroup; ++a) {
    int const n0 = thread_weight_row<Cfg::TileN>(tile, first_atom + a, tid);
    if constexpr (Cfg::EpilogueKind == Epilogue::SwiGLU && Mode == StoreMode::Lines) {
      store_swiglu_lines<Cfg>(st.acc[a], p, tile.expert, paired, n0, stage, consumer, tid);
    } else if constexpr (Cfg::EpilogueKind == Epilogue::SwiGLU) {
      if (swiglu_e4m3_output(p))  // uniform
        store_swiglu_paired<Cfg, true>(st.acc[a], p, tile.expert, paired, n0);
      else
        store_swiglu_paired<Cfg, false>(st.acc[a], p, tile.expert, paired, n0);
    } else if constexpr (Mode == StoreMode::Sectors) {
      store_columns_sectors<Cfg>(st.acc[a], p, tile.expert, paired, n0, scatter, g);
    } else if constexpr (Mode == StoreMode::Lines) {
      store_columns_lines<Cfg>(st.acc[a], p, tile.expert, paired, n0, scatter, stage, consumer, tid);
    } else {
      store_columns_paired<Cfg>(st.acc[a], p, tile.expert, paired, n0, scatter);
    }
  }
}

template <class Cfg, class Params>
__device__ __forceinline__ void store_tile(ConsumerState<Cfg> const& st, Params const& p, Tile const& tile,
                                           ExpertRows const& rows, int first_atom, int tid, uint8_t* stage,
                                           int consumer) {
  constexpr int WarpgroupCols = kAtomN * Cfg::AtomsPerWarpgroup;
  if constexpr (Cfg::EpilogueKind == Epilogue::SwiGLU) {
    if (swiglu_e4m3_output(p)) store_swiglu_row_scales<Cfg>(p, tile, rows, first_atom, tid);  // uniform
  }
  if constexpr (coalesced_stores_build() && Cfg::EpilogueKind == Epilogue::Store &&
                coalesced_pieces_fit<Cfg::TileM, WarpgroupCols>()) {  // diagnostic, never shipped
    if (sixteen_byte_stores_fit(p)) {
      int const m_base = tile.m_tile * Cfg::TileM;
      store_tile_coalesced<Cfg::AtomsPerWarpgroup, Cfg::Accumulators, Cfg::TileM, WarpgroupCols>(
          st.acc, p, rows.start + m_base, rows.count - m_base, tile.n_tile * Cfg::TileN + kAtomN * first_atom, tid);
      return;
    }
  }
  if constexpr (swiglu_lines_build() && Cfg::EpilogueKind == Epilogue::SwiGLU && Cfg::TileM % kLineStageRows == 0) {
    if (swiglu_lines_fit(p)) {  // uniform; the candidate, not shipped
      store_tile_paired<StoreMode::Lines>(st, p, tile, rows, first_atom, tid, stage, consumer);
      return;
    }
  }
  constexpr StoreMode Mode = paired_stores_build() ? StoreMode::Paired : Cfg::Stores;
  if constexpr (Mode != StoreMode::Paired) {
    static_assert(Cfg::EpilogueKind != Epilogue::SwiGLU && Cfg::TileM % (Mode == StoreMode::Lines ? 32 : 16) == 0,
                  "TileConfig.store_path picks 16-byte stores only for Store and ScaleScatter tiles they divide");
    if (sixteen_byte_stores_fit(p)) {  // uniform
      store_tile_paired<Mode>(st, p, tile, rows, first_atom, tid, stage, consumer);
      return;
    }
  }
  if (paired_stores_fit(p)) {  // uniform
    store_tile_paired<StoreMode::Paired>(st, p, tile, rows, first_atom, tid);
    return;
  }
  int const g = (tid & 31) >> 2, t = tid & 3;
  int const m_base = tile.m_tile * Cfg::TileM;
  int const m_limit = rows.count - m_base;  // valid tokens in this tile
#pragma unroll
  for (int a = 0; a < Cfg::AtomsPerWarpgroup; ++a) {
    int const n0 = thread_weight_row<Cfg::TileN>(tile, first_atom + a, tid);
#pragma unroll
    for (int i = 0; i < Cfg::TileM / 8; ++i) {
      // acc[a][4 i + r]: weight row n0 + 8 (r >> 1), x row 8 i + 2 t + (r & 1) of the tile.
      if constexpr (Cfg::EpilogueKind == Epilogue::SwiGLU) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          int const m = 8 * i + 2 * t + r;
          if (m < m_limit && n0 < p.n)
            store_swiglu(p, tile.expert, rows.start + m_base + m, n0, st.acc[a][4 * i + r], st.acc[a][4 * i + r + 2]);
        }
      } else {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          int const n = n0 + 8 * (r >> 1);
          int const m = 8 * i + 2 * t + (r & 1);
          if (m < m_limit && n < p.n)
            store_one<Cfg::EpilogueKind>(p, tile.expert, rows.start + m_base + m, n, st.acc[a][4 * i + r]);
        }
      }
    }
  }
}

// Ping-pong turns on hardware barriers 5 and 6 (0 is __syncthreads, 1..4 stream-K's), 256 threads each: the
// warpgroup that has waited for its unit's last stage arrives on the other's barrier; the other syncs on its own before
// waiting for its next unit's first stage. So a warpgroup never waits on a full barrier more than one phase ahead
// (a parity wait cannot tell phase p from p + 2), and the two take the tensor cores in turns.
template <int Id>
__device__ __forceinline__ void sync_256_threads() {
  asm volatile("bar.sync %0, 256;" ::"n"(Id) : "memory");
}

template <int Id>
__device__ __forceinline__ void arrive_256_threads() {
  asm volatile("bar.arrive %0, 256;" ::"n"(Id) : "memory");
}

__device__ __forceinline__ void wait_for_turn(int consumer) {
  if (consumer == 0) sync_256_threads<5>(); else sync_256_threads<6>();
}

__device__ __forceinline__ void pass_turn(int consumer) {
  if (consumer == 0) arrive_256_threads<6>(); else arrive_256_threads<5>();
}

template <class Cfg, class Params>
__device__ __forceinline__ void consume(Params const& p, SharedStorage<Cfg> const& s, int n_tiles, int total_tiles,
                                        int consumer, int tid) {
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  ConsumerState<Cfg> st;
  RingPosition ring;
  WaitProbe probe(tid == 0);
  Timeline line(tid == 0);
  int const k_tiles = (p.k_atoms + Cfg::AtomsK - 1) / Cfg::AtomsK;
  int const first_atom = Cfg::PingPong ? 0 : consumer * Cfg::AtomsPerWarpgroup;  // of the tile's atoms along N
  int const atom_offset = first_atom * Cfg::AtomsK * kAtomBytes;
  WorkCursor<Cfg::StreamK> work(total_tiles, k_tiles);
  WorkUnit unit;
  int unit_index = 0;  // ping-pong: the CTA's units alternate between the two consumer warpgroups
  while (work.fetch(k_tiles, unit)) {
    if constexpr (Cfg::PingPong) {
      int const index = unit_index++;
      if ((index & 1) != consumer) {  // the other warpgroup's unit: its stages pass by
        ring.advance_by<Cfg::Stages>(unit.k_end - unit.k_begin);
        continue;
      }
      if (index > 0) wait_for_turn(consumer);
    }
    Tile const tile = tile_coords(s.tile_prefix, p.num_experts, n_tiles, unit.tile);
    ExpertRows const rows = expert_rows(p, tile.expert);
    st.parts = tile_parts<Cfg>(rows.count - tile.m_tile * Cfg::TileM);
    // FP8 activations' row scales: the W4A8 kernel loads them now, so their latency hides under the k loop (the bf16
    // kernels, whose fragments need the registers, load them after it).
    TileRowScales<Cfg> scales;
    if constexpr (Cfg::Fp8) scales.load(p, tile, rows, first_atom, tid);
#pragma unroll
    for (int a = 0; a < Cfg::AtomsPerWarpgroup; ++a)
#pragma unroll
      for (int i = 0; i < Cfg::Accumulators; ++i) st.acc[a][i] = 0.0f;
    int previous_slot = 0;
    // Stage kt of the unit: `chunks` chunks, the first in register buffer `first`.
    auto stage = [&](int first, int kt, int chunks, bool release_previous) {
      long long const waited_from = probe.now();
      Barrier::wait(&s.full[ring.slot], ring.phase);
      probe.template add_since<kProbeConsumerFull>(waited_from);
      probe.template count<kProbeConsumerStages>();
      line.landed();
      uint8_t const* x_slot = s.x + ring.slot * Cfg::XStageBytes;
      uint8_t const* w_slot = s.w + ring.slot * Cfg::WStageBytes + atom_offset;
      if constexpr (copy_only_build()) {  // diagnostic (mxfp4_copy_only.cuh): no decode, no WGMMA, the slot back at once
        copy_only_stage(st.acc[0][0], w_slot, tid, &s.empty[ring.slot]);
      } else {
        constexpr int LastFirstBuffer = Cfg::AtomsK % Cfg::FragmentBuffers == 0 ? 0 : Cfg::FragmentBuffers - 1;
        consume_stage_from<LastFirstBuffer>(first, st, x_slot, w_slot, chunks, tid, release_previous,
                                            &s.empty[previous_slot], probe);
        previous_slot = ring.slot;
      }
      ring.advance<Cfg::Stages>();
    };
    if constexpr (Cfg::FragmentBuffers == 2 || copy_only_build()) {
      // Two buffers: the first buffer picked at run time, every stage releasing its predecessor's slot at chunk 0.
      for (int kt = unit.k_begin; kt < unit.k_end; ++kt)
        stage(first_buffer<Cfg>(kt - unit.k_begin), kt, min(Cfg::AtomsK, p.k_atoms - kt * Cfg::AtomsK),
              kt > unit.k_begin);
    } else {
      // F > 2. ptxas serializes every WGMMA of the kernel (ptxas 13.0: C7513, "non wgmma instructions defining
      // input registers of a wgmma between start and end of the pipeline"; NVRTC 13.5: C7511/C7512, "insufficient
      // register resources") where paths with other rotations of the buffers in flight meet: after a run-time pick
      // of the first buffer, a stage that may stop short (a run-time chunk count), or an exit from the middle of a
      // period. So whole periods of full stages run straight, their buffers and chunk counts constants; the stages
      // after them (fewer than a period, the short K tail among them) run one at a time from buffer 0 with no
      // WGMMA in flight before or after (wait_group<0> on both sides): a few stages of a tile lose the overlap.
      constexpr int Period = rotation_period<Cfg>();
      int const full_end = unit.k_end * Cfg::AtomsK > p.k_atoms ? unit.k_end - 1 : unit.k_end;  // a short K tail
      int const periods_end = unit.k_begin + (full_end - unit.k_begin) / Period * Period;
      // Slots, each released once: the unit's first stage has no predecessor; a stage of a period hands its
      // predecessor's slot back after its chunk F - 2 (it is full); a stage after the periods, after the
      // wait_group<0> before it; the unit's last stage, after the final wait_group<0> below.
      int kt = unit.k_begin;
      while (kt < periods_end) consume_period<Cfg>(stage, kt, unit.k_begin);
      cute::warpgroup_wait<0>();
      for (; kt < unit.k_end; ++kt) {
        if (kt > unit.k_begin) release_slot(&s.empty[previous_slot], tid);
        stage(0, kt, min(Cfg::AtomsK, p.k_atoms - kt * Cfg::AtomsK), false);
        cute::warpgroup_wait<0>();
      }
    }
    if constexpr (Cfg::PingPong) {
      if (work.has_next()) pass_turn(consumer);  // every stage of the unit has landed: the other may wait for its own
    }
    probe.template count<kProbeConsumerUnits>();
    if constexpr (!copy_only_build()) {
      // Every slot of the unit is released exactly once: a stage's slot by the next stage (consume_stage, or above
      // with F > 2), the last stage's here, when all of the unit's WGMMAs are complete.
      long long const drain_from = probe.now();
      cute::warpgroup_wait<0>();
      probe.template add_since<kProbeConsumerDrain>(drain_from);
      // The accumulators are read from here on: fenced, so that no read of them (nor a reuse of their registers) can
      // be scheduled before the wait, while the WGMMAs may still write them.
      st.fence_accumulators();
      release_slot(&s.empty[previous_slot], tid);
    }
    if constexpr (Cfg::StreamK) {
      bool const whole = unit.k_begin == 0 && unit.k_end == k_tiles;
      if (!whole && !stream_k_fixup<Cfg::Warpgroups>(st.acc, p, unit, k_tiles, total_tiles, consumer, tid,
                                                     &s.last_share[consumer]))
        continue;  // another CTA finishes this tile
    }
    if constexpr (no_epilogue_build()) {  // diagnostic (mxfp4_no_epilogue.cuh): the tile's epilogue left out
      keep_accumulators_live(st.acc, p.out);
      continue;
    }
    long long const epilogue_from = probe.now();
    if constexpr (!Cfg::Fp8) scales.load(p, tile, rows, first_atom, tid);
    scales.apply(st.acc, p, tid);  // FP8 activations: x (and W) row scales
    store_tile(st, p, tile, rows, first_atom, tid, s.line_stage + consumer * kLineStageBytes, consumer);
    probe.template add_since<kProbeConsumerEpilogue>(epilogue_from);
  }
  probe.template flush<kProbeConsumerCycles>();
  line.flush();
}

template <class Cfg, class Params>
__device__ __forceinline__ void grouped_mm_kernel(Params const& p) {
  extern __shared__ uint8_t shared_raw[];
  SharedStorage<Cfg> const s(shared_raw);
  int const warp = threadIdx.x >> 5;
  int const lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < Cfg::Stages; ++i) {
      cutlass::arch::ClusterTransactionBarrier::init(&s.full[i], 1);
      cutlass::arch::ClusterBarrier::init(&s.empty[i], 4 * Cfg::SlotReaders);  // one arrival per reading warp
    }
    cutlass::arch::fence_barrier_init();
  }
  if (warp == 0) build_tile_prefix<Cfg::TileM>(p, s.tile_prefix, lane);
  __syncthreads();

  int const n_tiles = (p.n + Cfg::TileN - 1) / Cfg::TileN;
  int const total_tiles = s.tile_prefix[p.num_experts] * n_tiles;
  // Broadcast from lane 0 so that ptxas knows the index (and the shared-memory addresses derived
  // from it) is warp-uniform: wgmma descriptors then stay in uniform registers, no R2UR per wgmma.
  int const warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);
  if constexpr (Cfg::ProducerWarp) {
    // Consumers are warpgroups 0 .. Warpgroups-1 (wgmma needs warpgroup-aligned warps); the producer
    // warp follows them. No setmaxnreg: every thread keeps the launch allocation.
    if (warpgroup == Cfg::Warpgroups) {
      if (threadIdx.x == 128 * Cfg::Warpgroups) produce<Cfg>(p, s, n_tiles, total_tiles);
    } else {
      consume<Cfg>(p, s, n_tiles, total_tiles, warpgroup, threadIdx.x & 127);
    }
  } else if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::ProducerRegs>();
    if (threadIdx.x == 0) produce<Cfg>(p, s, n_tiles, total_tiles);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Cfg::ConsumerRegs>();
    consume<Cfg>(p, s, n_tiles, total_tiles, warpgroup - 1, threadIdx.x & 127);
  }
}

}  // namespace mxfp4
