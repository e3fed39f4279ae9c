// y = x·Wᵀ + b + xs·Bᵀ on Hopper as one GEMM (lora_gemm_sm90.h says why). The design is the standard
// warp-specialised Hopper GEMM, kept small:
//
// - Tiles of 128 (tokens) × 256 (out), 64 along K per pipeline stage, 4 stages (192 KB of shared memory).
// - Clusters of two blocks on vertically adjacent tiles (same 256 columns of W): each block copies its own x tile
//   and half of the W tile, and the copy engine multicasts that half into both blocks. L2 then serves 32 KB per
//   block and stage instead of 48 KB: without it the GEMM is bound by L2 bandwidth (8 TB/s at cuBLAS's speed).
// - One producer warpgroup: a single thread issues the bulk tensor copies (TMA), 128-byte swizzled, each stage
//   completing on its `full` mbarrier once all 48 KB have landed.
// - Two consumer warpgroups, 64 rows each: per stage four wgmma.m64n256k16 into 128 float32 registers per thread,
//   then free the stage in both blocks of the cluster (`empty` counts 4 arrivals: a block's producer refills a
//   stage of its peer too).
// - The rank-r term is ⌈r/64⌉ more K blocks of the same loop, copied from xs and B instead of x and W; the copy
//   engine fills the columns past r with zeros, so they add nothing.
// - Persistent: as many clusters as fit walk the tiles (in groups of 16 row tiles, so the tiles in flight share
//   x's and W's rows in L2); the producer runs ahead into the next tile while the consumers store this one.
// - Epilogue: + bias in float32 (loaded when the tile starts), one rounding to x's dtype, written by each warp to
//   swizzled staging in shared memory and stored by the copy engine, so the next tile's MMAs overlap the stores.
//
// Built only where setup.py (or CMake) builds an sm_90a target and says so with LORA_EXT_HAS_SM90A (CUDA 12 or
// newer); otherwise this file compiles to the stubs at its end, and the forward keeps cuBLAS + the expand kernel.
#include <ATen/ATen.h>

#include "../error_message.h"
#include "lora_gemm_sm90.h"

#if defined(LORA_EXT_HAS_SM90A)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "async_copy.cuh"
#include "cluster_launch.h"
#include "dependent_launch.h"
#include "sm90_primitives.cuh"
#include "tensor_map.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kTileM = 128, kTileN = 256, kTileK = 64, kStages = 4;
constexpr int kThreads = 384;  // warpgroup 0 produces, 1 and 2 consume
constexpr int kClusterBlocks = 2;  // blocks of a cluster share (multicast) the W tile
static_assert(kMultiLoraPairRows == kTileM * kClusterBlocks, "a multi-adapter pair is a cluster's rows");
constexpr int kTileXBytes = kTileM * kTileK * 2;  // 16 KB
constexpr int kTileWBytes = kTileN * kTileK * 2;  // 32 KB
constexpr int kStageBytes = kTileXBytes + kTileWBytes;
// Epilogue staging, per consumer warpgroup: two 16 × 64 boxes of the output's tensor map per warp, 128-byte swizzled.
constexpr int kOutStagingBytes = 4 * 2 * 16 * 64 * 2;  // 16 KB
constexpr int kSharedBytes =
    kStages * kStageBytes + 2 * kOutStagingBytes + 2 * kStages * 8 + 1024;  // + barriers + alignment slack
static_assert(kSharedBytes <= 227 * 1024, "more shared memory than an H100 block may have");

// Where the forward's fused GEMM beats cuBLAS + the expand kernel (H100, bf16, docs/perf-notes.md v8, v11, v13). Our
// GEMM ran ~8% slower than cuBLAS's when this was measured (~4% since v15's epilogue), so it wins where the expand it
// saves (a read and a write of y, ∝ tokens·out) costs more than that (∝ tokens·out·in): up to in ≈ 4800 at r ≤ 16,
// further at larger ranks, whose expand costs more. Measured since the stmatrix epilogue (v11, v13): 8192 × 4096 ×
// 4096 forward 1.149× against 1.218×; 4096 tokens 1.218× against 1.237× (GPU 208 against 216 µs), 4096 × 4096 ×
// 11008 1.110× against 1.168×; 2048 tokens a tie (112 against 113 µs), so it starts at 4096. Every measured shape had out ≥ 4096; narrow outputs would waste most of
// the 256-wide tiles.
bool forward_gemm_pays(int64_t tokens, int64_t in_features, int64_t out_features, int64_t rank) {
  return tokens >= 4096 && out_features >= 2048 && in_features <= (rank > 16 ? 6144 : 4096);
}

// Where the backward's fused dx GEMM (K = out, N = in) beats cuBLAS's dy·W + the expand into dx (H100, bf16, v13).
// Read along its rows, W makes our GEMM only ~4% slower than cuBLAS's (351 against 337 µs at 8192 × 4096 × 4096),
// while the expand it saves costs 58 µs (77 at r = 64): GPU time per step −46 µs at 4096², −35 at K = 11008, −46 at
// K = 2048, −20 at 4096 tokens, −8.5 at 2048; at 1024 tokens the step is host-bound and a launch fewer wins
// (2.38× against 3.11×). Measured with N = in of 4096 and 11008; K up to 11008.
bool grad_x_gemm_pays(int64_t tokens, int64_t k, int64_t n) {
  return tokens >= 1024 && n >= 2048 && k <= 11008;
}

// How the GEMM's right operands lie in memory. The forward's W (out × in) and B (out × r) have N (= out) along their
// rows and K contiguous; the backward's dx = dy·W + dxs·A reads W (out × in) and A (r × in) with K along their rows
// and N (= in) contiguous. The copy engine writes either into shared memory as it is, and wgmma reads the second
// with its B operand transposed, so neither is ever copied.
enum class RightOperand { kKContiguous, kNContiguous };

// The dropout mask of dx's rank-r term: keep[t, k] multiplies (dxs·A)[t, k]. One byte per row and 8 columns, bit e for
// column 8g + e (dropout_keep8's bits), drawn earlier in the backward (dropout_keep_bytes.cuh); rows `pitch` bytes
// apart, pitch a multiple of 32 (a tile's 256 columns are 32 bytes: whole 16-byte loads). nullptr: no mask.
struct DropoutMask {
  const uint8_t* keep_bytes;
  int64_t pitch;
};

struct GemmShape {
  int64_t tokens, out;  // M, N
  int base_k_blocks;    // ⌈in / 64⌉ (K of the base product: in forward, out for dx)
  int lora_k_blocks;    // ⌈r / 64⌉
  // The rank K blocks' MMAs stop at this many of their K rows (16 each): r rounded up to 16, so that at r = 16 a
  // rank block costs one of its four MMAs (its other rows are the copy's zeros). lora_k_blocks · 64 = all four.
  int rank_k_extent;
  int row_pairs;        // ⌈⌈tokens / 128⌉ / 2⌉: a cluster works on two vertically adjacent tiles
  int column_tiles;     // ⌈out / 256⌉
  // Several adapters (multi_lora.cu, lora_gemm_sm90.h): per pair p of 256 rows (both tiles of a cluster),
  // pair_passes[p] rank-r terms, each with the B of slot pair_slot_list[p][i] from the stack (slots·out × r) and its
  // own rows of xs (the pair's rows of other slots zero there); negative: none (the expand adds the pair's terms).
  // nullptr: one adapter.
  const int32_t* pair_passes;
  const int32_t* pair_slot_list;
  int pair_slots;     // the most terms a pair may have (pair_slot_list's row length; xs_by_pass's blocks per pair)
  int64_t slot_rows;  // rows of the stack per slot (out)
};

// The rank-r K blocks of the tile with origin m0 (both blocks of a cluster agree: one pair).
__device__ __forceinline__ int tile_lora_k_blocks(const GemmShape& s, int m0) {
  if (s.pair_passes == nullptr) return s.lora_k_blocks;
  return max(__ldg(s.pair_passes + m0 / kMultiLoraPairRows), 0) * s.lora_k_blocks;
}

// Where rank-r K block kb (< tile_lora_k_blocks) of the tile with origin m0 reads: xs's row and column, and the
// row offset of B in the stack.
__device__ __forceinline__ void lora_k_block_origin(const GemmShape& s, int m0, int kb, int& xs_row, int& k0,
                                                    int64_t& b_row_offset) {
  if (s.pair_passes == nullptr) {
    xs_row = m0;
    k0 = kb * kTileK;
    b_row_offset = 0;
    return;
  }
  const int pair = m0 / kMultiLoraPairRows, pass = kb / s.lora_k_blocks;
  xs_row = (pair * s.pair_slots + pass) * kMultiLoraPairRows + m0 % kMultiLoraPairRows;
  k0 = (kb % s.lora_k_blocks) * kTileK;
  b_row_offset = static_cast<int64_t>(__ldg(s.pair_slot_list + pair * s.pair_slots + pass)) * s.slot_rows;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kGroupRowTiles = 16;
constexpr int kGroupRowPairs = kGroupRowTiles / kClusterBlocks;
constexpr uint16_t kBothBlocks = (1u << kClusterBlocks) - 1;  // the multicast mask: every block of the cluster
constexpr int kTileWPartBytes = kTileN / kClusterBlocks * kTileK * 2;  // the part of W each block copies for all

// The tile of block `block_rank` of the cluster working on `pair_tile` (two vertically adjacent tiles), grouped so
// that the tiles in flight at once share rows of x and W in L2.
__device__ __forceinline__ void tile_origin(int pair_tile, uint32_t block_rank, const GemmShape& s, int& m0, int& n0) {
  const int per_group = kGroupRowPairs * s.column_tiles;
  const int first_pair = (pair_tile / per_group) * kGroupRowPairs;
  const int pairs_in_group = min(s.row_pairs - first_pair, kGroupRowPairs);
  const int in_group = pair_tile % per_group;
  m0 = ((first_pair + in_group % pairs_in_group) * kClusterBlocks + static_cast<int>(block_rank)) * kTileM;
  n0 = (in_group / pairs_in_group) * kTileN;
}

// Two float32 values rounded (to nearest even) to T and packed into one 32-bit word, the first in the low half: one
// cvt instruction per pair.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float first, float second) {
  uint32_t word;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(word) : "f"(second), "f"(first));  // a → the high half, b → the low
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(word) : "f"(second), "f"(first));
  }
  return word;
}

// The keep bytes of a consumer thread's accumulators in one tile: for row half h (rows +0 and +8), the 32 bytes of
// the tile's 32 eight-column blocks, as two 16-byte loads. Loaded when the tile starts, so the loads are in flight
// while the rank-r K blocks' MMAs run.
struct TileKeepBytes {
  uint4 half[2][2];
};

__device__ __forceinline__ void load_keep_bytes(TileKeepBytes& keep, const DropoutMask& mask, int64_t tokens, int64_t row,
                                                int n0) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t r = row + 8 * h;
      keep.half[h][c] = r < tokens ? __ldg(reinterpret_cast<const uint4*>(mask.keep_bytes + r * mask.pitch + n0 / 8) + c)
                                   : make_uint4(0, 0, 0, 0);
    }
  }
}

// Zeroes the accumulators (the rank-r term alone at this point) of the dropped elements: block j's byte holds this
// lane's two columns 8j + 2(lane % 4) and +1 at bits 2(lane % 4) and +1.
__device__ __forceinline__ void apply_keep_bytes(float (&acc)[128], const TileKeepBytes& keep) {
  const int shift = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t words[8] = {keep.half[h][0].x, keep.half[h][0].y, keep.half[h][0].z, keep.half[h][0].w,
                               keep.half[h][1].x, keep.half[h][1].y, keep.half[h][1].z, keep.half[h][1].w};
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const uint32_t pair = words[j / 4] >> (8 * (j % 4) + shift);
      if ((pair & 1u) == 0) acc[4 * j + 2 * h] = 0.f;
      if ((pair & 2u) == 0) acc[4 * j + 2 * h + 1] = 0.f;
    }
  }
}

// The bias values of columns `column` and +1 as they are in memory (two 16-bit values in one word, the first in the
// low half), zero past the output's last column or without a bias. out is a multiple of 8, so a pair is wholly in.
template <typename T>
__device__ __forceinline__ uint32_t load_bias_pair(const T* bias, int64_t column, int64_t out) {
  if (bias == nullptr || column >= out) return 0;
  T pair[2] = {bias[column], bias[column + 1]};
  uint32_t word;
  memcpy(&word, pair, sizeof(word));
  return word;
}

// A tile's 256 bias values as each warp holds them: lane l has the column pairs l, l + 32, l + 64 and l + 96 (columns
// n0 + 2·pair, +1), loaded when the tile starts so that the loads are long done by the epilogue, which passes them
// among its lanes by shuffles. Loaded in the epilogue's loop instead, the bias cost 11 µs of the 8192 × 4096² GEMM
// (each load waited out before the next stmatrix; docs/perf-notes.md v15).
struct TileBias {
  uint32_t pairs[4];
};

template <typename T>
__device__ __forceinline__ void load_tile_bias(TileBias& tile_bias, const T* bias, int n0, int64_t out, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) tile_bias.pairs[i] = load_bias_pair(bias, n0 + 2 * (lane + 32 * i), out);
}

template <typename T>
__device__ __forceinline__ float2 unpack_pair(uint32_t word) {
  T pair[2];
  memcpy(pair, &word, sizeof(word));
  return make_float2(static_cast<float>(pair[0]), static_cast<float>(pair[1]));
}

// A consumer warpgroup's epilogue: its 64 × 256 accumulators (+ bias), rounded once to T, out through the copy engine,
// so that the next tile's MMAs start while the rows are written (storing straight from the registers cost 37 µs of
// the 8192 × 4096² GEMM, docs/perf-notes.md v8). Accumulator layout of m64n256: thread (warp w, lane l) holds, for
// each 8-column block j, rows 16w + l/4 (+8) and columns 8j + 2(l%4) (+1) in acc[4j .. 4j+3]. Each warp stores its own
// 16 rows, 64 columns at a time, through two 2 KB boxes of the warpgroup's staging buffer (16 rows × 64 columns,
// 128-byte swizzled as the output map expects) used in turn: stmatrix writes the accumulators' layout as it is (the
// shuffle transposes it replaced cost 14% of the consumers' time, v11), and the warp's first lane issues the store.
// A box is written again once the store from two rounds before has read it, so warps wait on nothing but their own
// stores: 1–1.5 µs per GEMM faster than warpgroup-wide rounds of 128 columns with barriers (v15).
template <typename T, bool kHasBias>
__device__ __forceinline__ void store_tile(const float (&acc)[128], const TileBias& tile_bias, unsigned char* staging,
                                           const CUtensorMap* y_map, int64_t row0, int n0, int64_t out, int thread) {
  using namespace sm90;
  constexpr int kBoxColumns = 64, kBoxBytes = 16 * kBoxColumns * 2;  // 2 KB
  const int warp = thread / 32, lane = thread % 32;
  unsigned char* warp_staging = staging + warp * 2 * kBoxBytes;
  // stmatrix: lane l addresses row l % 8 of matrix l / 8; per 16-column chunk the matrices are (rows 0–7, columns
  // 0–7), (rows 8–15, columns 0–7), (rows 0–7, columns 8–15), (rows 8–15, columns 8–15) of the warp's 16 rows.
  const int matrix = lane / 8;
  const int local_row = (matrix & 1) * 8 + lane % 8;  // the row of the warp's 16 this lane addresses
  const int matrix_half = matrix >> 1;                // its 8-column half of each chunk
  const int quad_lane = lane % 4;
#pragma unroll
  for (int round = 0; round < kTileN / kBoxColumns; ++round) {
    unsigned char* box = warp_staging + (round % 2) * kBoxBytes;
    if (lane == 0) bulk_wait_source_read<1>();  // the store of two rounds ago (this box's last) has read it
    __syncwarp();
#pragma unroll
    for (int c = 0; c < kBoxColumns / 16; ++c) {
      const int chunk = round * (kBoxColumns / 16) + c;
      const int block0 = 2 * chunk, block1 = 2 * chunk + 1;
      float2 bias0 = make_float2(0.f, 0.f), bias1 = make_float2(0.f, 0.f);
      if constexpr (kHasBias) {
        // This lane's column pair in block0 (tile column 16·chunk + 2·quad_lane) is pair 8·chunk + quad_lane, held
        // by lane (8·chunk + quad_lane) % 32 in its register chunk / 4; block1's is 4 pairs on.
        const uint32_t word = tile_bias.pairs[chunk / 4];
        bias0 = unpack_pair<T>(__shfl_sync(0xffffffffu, word, 8 * (chunk % 4) + quad_lane));
        bias1 = unpack_pair<T>(__shfl_sync(0xffffffffu, word, 8 * (chunk % 4) + 4 + quad_lane));
      }
      // 16 bytes at (local_row, columns 16c + 8·matrix_half of the box), 128-byte swizzle.
      const int chunk16 = c * 2 + matrix_half;
      unsigned char* row_address = box + local_row * 128 + ((chunk16 ^ (local_row % 8)) * 16);
      store_matrices_x4(row_address, pack_pair<T>(acc[4 * block0] + bias0.x, acc[4 * block0 + 1] + bias0.y),
                        pack_pair<T>(acc[4 * block0 + 2] + bias0.x, acc[4 * block0 + 3] + bias0.y),
                        pack_pair<T>(acc[4 * block1] + bias1.x, acc[4 * block1 + 1] + bias1.y),
                        pack_pair<T>(acc[4 * block1 + 2] + bias1.x, acc[4 * block1 + 3] + bias1.y));
    }
    fence_shared_for_copy_engine();
    __syncwarp();
    if (lane == 0) {
      const int column = n0 + round * kBoxColumns;
      if (column < out) store_tile_async(y_map, box, column, row0 + warp * 16);
      bulk_commit();
    }
  }
}

// A consumer warpgroup is done reading a stage: tell both blocks' producers (each refills part of it).
__device__ __forceinline__ void release_stage(uint64_t* empty_barrier) {
  for (uint32_t block = 0; block < kClusterBlocks; ++block) sm90::mbarrier_arrive_cluster(empty_barrier, block);
}
#endif

template <typename T, RightOperand kRight, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1)
    lora_gemm_sm90_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                          const __grid_constant__ CUtensorMap xs_map, const __grid_constant__ CUtensorMap b_map,
                          const __grid_constant__ CUtensorMap y_map, const T* __restrict__ bias,
                          const GemmShape shape, const DropoutMask dropout) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  extern __shared__ unsigned char shared_raw[];
  // The 128-byte swizzle pattern repeats every 1024 bytes: tiles start on a 1024-byte boundary.
  unsigned char* shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared_raw) + 1023) & ~uintptr_t{1023});
  unsigned char* out_staging = shared + kStages * kStageBytes;  // 2 × 16 KB, 1024-byte aligned
  uint64_t* full = reinterpret_cast<uint64_t*>(out_staging + 2 * kOutStagingBytes);
  uint64_t* empty = full + kStages;

  const int warpgroup = threadIdx.x / 128, thread = threadIdx.x % 128;
  const uint32_t block_rank = cluster_block_rank();
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);                   // the producer's arrival (+ the copies' 48 KB)
      mbarrier_init(&empty[s], 2 * kClusterBlocks);  // each consumer warpgroup of both blocks
    }
    fence_barrier_init();
  }
  cluster_sync();  // the peer's barriers exist before any copy or arrival names them
  // Launched as a programmatic dependent (dependent_launch.h): the set-up above overlapped the kernel ahead's end; its
  // outputs (the rank-r operand among them) are read only after this.
  wait_for_preceding_kernel();

  const int pair_tiles = shape.row_pairs * shape.column_tiles;

  if (warpgroup == 0) {
    release_registers<40>();
    if (thread == 0) {
      prefetch_tensor_map(&x_map);
      prefetch_tensor_map(&w_map);
      prefetch_tensor_map(&xs_map);
      prefetch_tensor_map(&b_map);
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = cluster_index(); tile < pair_tiles; tile += cluster_count()) {
        int m0, n0;
        tile_origin(tile, block_rank, shape, m0, n0);
        const int w_row = n0 + static_cast<int>(block_rank) * (kTileN / kClusterBlocks);  // this block's part of W
        const int lora_k_blocks = tile_lora_k_blocks(shape, m0);
        const int k_blocks = shape.base_k_blocks + lora_k_blocks;
        for (int kb = 0; kb < k_blocks; ++kb) {
          // The consumers of both blocks have freed this stage (passes at first use): this block's W part
          // lands in the peer's stage too.
          mbarrier_wait(&empty[stage], phase ^ 1);
          unsigned char* x_tile = shared + stage * kStageBytes;
          unsigned char* w_part = x_tile + kTileXBytes + block_rank * kTileWPartBytes;
          mbarrier_arrive_expect_bytes(&full[stage], kStageBytes);  // whole boxes, zero-filled parts included
          // The rank-r K blocks first: with dropout, the consumers mask that term alone before the base product
          // joins it.
          const bool base = kb >= lora_k_blocks;
          int k0 = (kb - lora_k_blocks) * kTileK, left_row = m0;
          int64_t b_row_offset = 0;
          if (!base) lora_k_block_origin(shape, m0, kb, left_row, k0, b_row_offset);
          copy_tile_async(x_tile, base ? &x_map : &xs_map, &full[stage], k0, left_row);
          const CUtensorMap* right_map = base ? &w_map : &b_map;
          if constexpr (kRight == RightOperand::kKContiguous) {
            // (the stack's rows fit 32 bits: launch_gemm checks)
            const int right_row = static_cast<int>(w_row + b_row_offset);
            copy_tile_multicast_async(w_part, right_map, &full[stage], k0, right_row, kBothBlocks);
          } else {
            // This block's 128 columns of the K block as two (64 K rows × 64 columns) boxes, one after the other.
            copy_tile_multicast_async(w_part, right_map, &full[stage], w_row, k0, kBothBlocks);
            copy_tile_multicast_async(w_part + kTileWPartBytes / 2, right_map, &full[stage], w_row + 64, k0,
                                      kBothBlocks);
          }
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    claim_registers<232>();
    const int consumer = warpgroup - 1;  // rows 64·consumer … +63 of the tile
    float acc[128];
    int stage = 0;
    uint32_t phase = 0;
    // Dropout: the first of this thread's rows in a tile (accumulator layout: its warp's 16 of its warpgroup's 64).
    const int64_t thread_row = consumer * 64 + (thread / 32) * 16 + (thread % 32) / 4;
    for (int tile = cluster_index(); tile < pair_tiles; tile += cluster_count()) {
      int m0, n0;
      tile_origin(tile, block_rank, shape, m0, n0);
      TileKeepBytes keep;
      if constexpr (kDropout) load_keep_bytes(keep, dropout, shape.tokens, m0 + thread_row, n0);
      TileBias tile_bias{};
      if (bias != nullptr) load_tile_bias(tile_bias, bias, n0, shape.out, thread % 32);
      const int lora_k_blocks = tile_lora_k_blocks(shape, m0);
      const int k_blocks = shape.base_k_blocks + lora_k_blocks;
      int previous_stage = -1;
      // One stage's MMAs: all four of a base K block, or for a rank K block (they come first) only those up to r
      // rounded up to 16 (its rows past r are the copy's zeros; the count depends on kb only, so every warpgroup of
      // the block issues as many). Two loops, so that the base blocks' MMAs stay one straight run without a branch.
      // The lambda must be inlined (it holds acc by reference): `cuobjdump -res-usage` on the built object shows
      // LOCAL:0 and STACK:0 for every variant of this kernel (168 registers), as before the split.
      auto consume_stage = [&](int kb, int k_steps, auto all_steps_tag) {
        constexpr bool kAllSteps = decltype(all_steps_tag)::value;
        mbarrier_wait(&full[stage], phase);
        const unsigned char* x_tile = shared + stage * kStageBytes + consumer * 64 * 128;
        const unsigned char* w_tile = shared + stage * kStageBytes + kTileXBytes;
#pragma unroll
        for (int i = 0; i < 128; ++i) fence_accumulator(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kTileK / 16; ++ks) {
          if constexpr (!kAllSteps) {
            if (ks >= k_steps) break;
          }
          const uint64_t desc_x = swizzled_tile_descriptor(x_tile + ks * 32);
          const int accumulate = (kb > 0 || ks > 0) ? 1 : 0;
          if constexpr (kRight == RightOperand::kKContiguous) {
            const uint64_t desc_w = swizzled_tile_descriptor(w_tile + ks * 32);
            if constexpr (std::is_same_v<T, at::BFloat16>) {
              wgmma_m64n256k16_bf16(acc, desc_x, desc_w, accumulate);
            } else {
              wgmma_m64n256k16_f16(acc, desc_x, desc_w, accumulate);
            }
          } else {
            // 16 K rows = two 8-row swizzle atoms of every 64-column box (kTileK × 64 × 2 bytes apart).
            const uint64_t desc_w = swizzled_n_major_tile_descriptor(w_tile + ks * 16 * 128, kTileK * 64 * 2);
            if constexpr (std::is_same_v<T, at::BFloat16>) {
              wgmma_m64n256k16_bf16_n_major_b(acc, desc_x, desc_w, accumulate);
            } else {
              wgmma_m64n256k16_f16_n_major_b(acc, desc_x, desc_w, accumulate);
            }
          }
        }
        wgmma_commit();
#pragma unroll
        for (int i = 0; i < 128; ++i) fence_accumulator(acc[i]);
        if constexpr (kDropout) {
          if (kb == lora_k_blocks - 1) {
            // The rank-r term is complete (its K blocks come first): drop its masked elements before the base
            // product accumulates onto it.
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < 128; ++i) fence_accumulator(acc[i]);
            apply_keep_bytes(acc, keep);
#pragma unroll
            for (int i = 0; i < 128; ++i) fence_accumulator(acc[i]);
          }
        }
        // Keep this stage's MMAs in flight; the previous stage's are done now, so free that stage.
        wgmma_wait<1>();
        if (previous_stage >= 0 && thread == 0) release_stage(&empty[previous_stage]);
        previous_stage = stage;
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      };
      for (int kb = 0; kb < lora_k_blocks; ++kb) {
        const int rank_k0 = (kb % shape.lora_k_blocks) * kTileK;
        consume_stage(kb, min(kTileK / 16, (shape.rank_k_extent - rank_k0) / 16), std::false_type{});
      }
      for (int kb = lora_k_blocks; kb < k_blocks; ++kb) consume_stage(kb, kTileK / 16, std::true_type{});
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 128; ++i) fence_accumulator(acc[i]);
      if (thread == 0) release_stage(&empty[previous_stage]);

      unsigned char* staging = out_staging + consumer * kOutStagingBytes;
      const int64_t row0 = m0 + consumer * 64;
      if (bias != nullptr) {
        store_tile<T, true>(acc, tile_bias, staging, &y_map, row0, n0, shape.out, thread);
      } else {
        store_tile<T, false>(acc, tile_bias, staging, &y_map, row0, n0, shape.out, thread);
      }
    }
    // Each warp's first lane committed its warp's stores (store_tile), and bulk groups belong to the thread that
    // committed them: every one of those lanes waits for its own before the block (and its shared memory) goes.
    if (thread % 32 == 0) bulk_wait_all();
  }
  cluster_sync();  // no block leaves while its peer may still copy into it or arrive on its barriers
#else
  // The other targets of a multi-architecture build: never launched (kernel_clusters() sees this image's few
  // registers and refuses), and if it ever were, an error rather than an output left unwritten.
  (void)x_map, (void)w_map, (void)xs_map, (void)b_map, (void)y_map, (void)bias, (void)shape, (void)dropout;
  __trap();
#endif
}

// Tensor map of a (rows × columns) row-major 16-bit matrix, read or written in (box_rows × 64) boxes, 128-byte
// swizzled (tensor_map.h).
CUtensorMap tile_map(const at::Tensor& t, int64_t columns, uint32_t box_rows) {
  return swizzled_tile_map(t.data_ptr(), t.scalar_type(), t.size(0), columns, t.stride(0), box_rows);
}

cudaLaunchConfig_t launch_config(unsigned clusters, cudaStream_t stream, cudaLaunchAttribute* cluster) {
  cudaLaunchConfig_t config = {};
  *cluster = cluster_along_x(kClusterBlocks);
  config.attrs = cluster;
  config.numAttrs = 1;
  config.gridDim = dim3(kClusterBlocks * clusters);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSharedBytes;
  config.stream = stream;
  return config;
}

// How many clusters of the kernel can be resident at once on the current device, or 0 where it cannot run there;
// decided once per device (and dtype). It cannot run where the image that loads is not the sm_90a one (a
// multi-architecture build also carries the other targets' stub: the real kernel's accumulators alone take 128
// registers, the stub a handful), where its shared memory cannot be raised to kSharedBytes, where no cluster of it
// fits, or where the driver cannot encode tensor maps. Setting the shared-memory limit here, once, also serves
// every later launch on the device.
template <typename T, RightOperand kRight, bool kDropout = false>
int kernel_clusters() {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> decided{};  // 0: not yet; -1: cannot run; > 0: clusters
  // (one table per instantiation: each kernel's attributes are set and its occupancy asked for separately)
  const int device = c10::cuda::current_device();
  std::atomic<int>* slot = device < kMaxDevices ? &decided[device] : nullptr;
  if (slot != nullptr) {
    const int known = slot->load();
    if (known != 0) return std::max(known, 0);
  }
  auto kernel = lora_gemm_sm90_kernel<T, kRight, kDropout>;
  int clusters = 0;
  cudaFuncAttributes attributes{};
  bool failed = false;
  if (tensor_map_encoder() != nullptr) {
    failed = cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess;
    if (!failed && attributes.numRegs >= 128) {
      failed = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes) != cudaSuccess;
      if (!failed) {
        cudaLaunchAttribute cluster;
        const cudaLaunchConfig_t config = launch_config(1, nullptr, &cluster);
        failed = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess;
      }
    }
  }
  if (failed) {
    clusters = 0;
    (void)cudaGetLastError();  // the refused query's error, not left for the next kernel launch to report
  }
  if (slot != nullptr) slot->store(clusters > 0 ? clusters : -1);
  return std::max(clusters, 0);
}

// LORA_EXT_FUSED_GEMM: unset or 1 = where it is faster (forward_gemm_pays, grad_x_gemm_pays), 0 = never (benchmarks/fused_gemm_ab.py
// compares both), force = on every shape it supports (tests/test_fused_gemm_cuda.py covers its edge cases on small
// shapes).
enum class FusedGemmSetting { kOff, kAuto, kForce };
// LORA_EXT_GEMM_RANK_STEPS=0 runs all four MMAs of every rank K block (the zeros past r included), as before
// session 21, for same-process comparisons (benchmarks/switch_ab.py); unset: they stop at r rounded up to 16.
bool rank_k_steps_trimmed() {
  const char* setting = std::getenv("LORA_EXT_GEMM_RANK_STEPS");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

FusedGemmSetting fused_gemm_setting() {
  const char* setting = std::getenv("LORA_EXT_FUSED_GEMM");
  if (setting == nullptr) return FusedGemmSetting::kAuto;
  if (std::strcmp(setting, "0") == 0) return FusedGemmSetting::kOff;
  if (std::strcmp(setting, "force") == 0) return FusedGemmSetting::kForce;
  return FusedGemmSetting::kAuto;
}

// LORA_EXT_FUSED_GRAD_X=0 keeps the backward's dx on cuBLAS + the expand while the forward keeps the fused GEMM
// (benchmarks compare both in one process).
bool fused_grad_x_enabled() {
  const char* setting = std::getenv("LORA_EXT_FUSED_GRAD_X");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

// The checks both GEMMs share: left (M × K) and weight in one 16-bit dtype with rows the copy engine can read, the
// shape one where the GEMM pays (or forced), a Hopper GPU on which the kernel of this layout can run.
template <RightOperand kRight>
bool gemm_usable(const at::Tensor& left, const at::Tensor& weight, int64_t k, int64_t n, int64_t rank, bool pays) {
  const FusedGemmSetting setting = fused_gemm_setting();
  if (setting == FusedGemmSetting::kOff) return false;
  const auto dtype = left.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (weight.scalar_type() != dtype) return false;
  const int64_t tokens = left.size(0);
  if (rank < 1) return false;
  if (setting == FusedGemmSetting::kAuto && !pays) return false;
  if (k % 8 != 0 || n % 8 != 0) return false;
  // Tile origins and copy coordinates are 32-bit: the last row pair's origin (up to 2 tiles past the last row) and
  // the last column tile's second half must fit.
  if (tokens > INT32_MAX - 2 * kTileM || n > INT32_MAX - kTileN || k > INT32_MAX) return false;
  if (!copy_engine_rows(left) || !copy_engine_rows(weight)) return false;
  const auto* properties = at::cuda::getDeviceProperties(left.get_device());
  if (properties->major != 9 || properties->minor != 0) return false;
  auto runs = [](auto type_tag) {
    using T = decltype(type_tag);
    if (kernel_clusters<T, kRight>() <= 0) return false;
    // dx's masked variant (dropout) is a kernel of its own: asked here too, so that a GPU where it cannot run falls
    // back to cuBLAS instead of raising at its launch.
    if constexpr (kRight == RightOperand::kNContiguous) return kernel_clusters<T, kRight, true>() > 0;
    return true;
  };
  return dtype == at::kBFloat16 ? runs(at::BFloat16{}) : runs(at::Half{});
}

// out (M × N, new) = left·right + left_rank·right_rank (+ bias), one GEMM over K + r. The right operands are
// (N × K) and (N × r) for kKContiguous, (K × N) and (r × N) for kNContiguous.
template <RightOperand kRight>
at::Tensor launch_gemm(const at::Tensor& left, const at::Tensor& right, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& left_rank, const at::Tensor& right_rank, int64_t k, int64_t n,
                       const DropoutMask dropout = DropoutMask{nullptr, 0}, const at::Tensor& pair_passes = {},
                       const at::Tensor& pair_slot_list = {}) {
  const int64_t tokens = left.size(0), rank = left_rank.size(1);
  at::Tensor out = at::empty({tokens, n}, left.options());
  if (tokens == 0) return out;
  constexpr bool k_contiguous = kRight == RightOperand::kKContiguous;
  TORCH_INTERNAL_ASSERT(copy_engine_rows(left_rank) && copy_engine_rows(right_rank) &&
                        left_rank.scalar_type() == left.scalar_type() && right_rank.scalar_type() == left.scalar_type() &&
                        right_rank.size(k_contiguous ? 1 : 0) == rank);
  // The right operands are copied in half-tiles (128 of the tile's 256 columns), one per block of the cluster
  // (multicast to both): one (128 × 64 K) box of a K-contiguous matrix, or two (64 K × 64) boxes of an N-contiguous
  // one.
  const uint32_t right_box_rows = k_contiguous ? kTileN / kClusterBlocks : kTileK;
  const CUtensorMap left_map = tile_map(left, k, kTileM), right_map = tile_map(right, k_contiguous ? k : n, right_box_rows);
  const CUtensorMap left_rank_map = tile_map(left_rank, rank, kTileM);
  const CUtensorMap right_rank_map = tile_map(right_rank, k_contiguous ? rank : n, right_box_rows);
  const CUtensorMap out_map = tile_map(out, n, 16);  // the epilogue's boxes: a warp's 16 rows × 64 columns
  GemmShape shape;
  shape.tokens = tokens;
  shape.out = n;
  shape.base_k_blocks = static_cast<int>((k + kTileK - 1) / kTileK);
  shape.lora_k_blocks = static_cast<int>((rank + kTileK - 1) / kTileK);
  shape.rank_k_extent = rank_k_steps_trimmed() ? static_cast<int>((rank + 15) / 16 * 16) : shape.lora_k_blocks * kTileK;
  const int64_t row_tiles = (tokens + kTileM - 1) / kTileM;
  shape.row_pairs = static_cast<int>((row_tiles + kClusterBlocks - 1) / kClusterBlocks);
  shape.column_tiles = static_cast<int>((n + kTileN - 1) / kTileN);
  shape.pair_passes = nullptr;
  shape.pair_slot_list = nullptr;
  shape.pair_slots = 0;
  shape.slot_rows = n;
  if (pair_passes.defined()) {
    const int64_t pairs = (tokens + kMultiLoraPairRows - 1) / kMultiLoraPairRows;
    const int64_t slots = pair_slot_list.dim() == 2 ? pair_slot_list.size(1) : 0;
    TORCH_INTERNAL_ASSERT(k_contiguous && pair_passes.scalar_type() == at::kInt && pair_passes.is_contiguous() &&
                          pair_passes.numel() == pairs && pair_slot_list.scalar_type() == at::kInt &&
                          pair_slot_list.is_contiguous() && pair_slot_list.size(0) == pairs && slots >= 1 &&
                          slots <= kMultiLoraMaxPairSlots && left_rank.size(0) == pairs * slots * kMultiLoraPairRows &&
                          right_rank.size(0) % n == 0 && right_rank.size(0) <= INT32_MAX &&
                          left_rank.size(0) <= INT32_MAX);
    shape.pair_passes = pair_passes.data_ptr<int32_t>();
    shape.pair_slot_list = pair_slot_list.data_ptr<int32_t>();
    shape.pair_slots = static_cast<int>(slots);
  }
  const int pair_tiles = shape.row_pairs * shape.column_tiles;
  const bool has_bias = bias.has_value() && bias->defined();
  auto launch = [&](auto type_tag, auto dropout_tag) {
    using T = decltype(type_tag);
    constexpr bool kDropout = decltype(dropout_tag)::value;
    // As many clusters as fit at once (not every SM pair can host one), or fewer if there are fewer tiles.
    const int clusters = kernel_clusters<T, kRight, kDropout>();
    LORA_CHECK(clusters > 0, "lora_ext: the fused Hopper GEMM cannot run on this GPU (its usable check said so)");
    cudaLaunchAttribute attributes[2];
    cudaLaunchConfig_t config =
        launch_config(static_cast<unsigned>(std::min(pair_tiles, clusters)), at::cuda::getCurrentCUDAStream(), attributes);
    attributes[1] = programmatic_stream_serialization();
    // No dependent_launch_supported() here: kernel_clusters() accepted this kernel only with its sm_90a image loaded
    // (≥ 128 registers; every other image is the few-register __trap stub), and that image's wait is real.
    if (dependent_launch_wanted() && dependent_launch_enabled()) config.numAttrs = 2;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, lora_gemm_sm90_kernel<T, kRight, kDropout>, left_map, right_map,
                                      left_rank_map, right_rank_map, out_map,
                                      has_bias ? bias->data_ptr<T>() : nullptr, shape, dropout));
  };
  auto launch_typed = [&](auto type_tag) {
    if constexpr (kRight == RightOperand::kNContiguous) {  // only dx has a masked term
      if (dropout.keep_bytes != nullptr) return launch(type_tag, std::true_type{});
    }
    launch(type_tag, std::false_type{});
  };
  if (left.scalar_type() == at::kBFloat16) {
    launch_typed(at::BFloat16{});
  } else {
    launch_typed(at::Half{});
  }
  return out;
}

}  // namespace

bool fused_lora_gemm_usable(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            int64_t rank) {
  if (bias.has_value() && bias->defined() && (bias->scalar_type() != x.scalar_type() || !bias->is_contiguous())) {
    return false;
  }
  const int64_t in_features = x.size(1), out_features = weight.size(0);
  return gemm_usable<RightOperand::kKContiguous>(x, weight, in_features, out_features, rank,
                                                 forward_gemm_pays(x.size(0), in_features, out_features, rank));
}

bool fused_lora_grad_x_usable(const at::Tensor& grad_y, const at::Tensor& weight, int64_t rank) {
  const int64_t k = weight.size(0), n = weight.size(1);
  return fused_grad_x_enabled() &&
         gemm_usable<RightOperand::kNContiguous>(grad_y, weight, k, n, rank, grad_x_gemm_pays(grad_y.size(0), k, n));
}

at::Tensor lora_gemm_operand(const at::Tensor& t, at::ScalarType dtype, double scale) {
  if (scale == 1.0 && t.scalar_type() == dtype && copy_engine_rows(t)) return t;
  at::Tensor operand = new_lora_gemm_operand(t.size(0), t.size(1), t.options().dtype(dtype));
  finish_lora_gemm_operand(operand, t, scale, 0);
  return operand;
}

at::Tensor fused_lora_gemm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& xs, const at::Tensor& lora_B) {
  return launch_gemm<RightOperand::kKContiguous>(x, weight, bias, xs, lora_B, x.size(1), weight.size(0));
}

at::Tensor fused_multi_lora_gemm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& xs_by_pass, const at::Tensor& lora_B_rows,
                                 const at::Tensor& pair_passes, const at::Tensor& pair_slot_list) {
  return launch_gemm<RightOperand::kKContiguous>(x, weight, bias, xs_by_pass, lora_B_rows, x.size(1), weight.size(0),
                                                 DropoutMask{nullptr, 0}, pair_passes, pair_slot_list);
}

at::Tensor fused_lora_grad_x(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_s,
                             const at::Tensor& lora_A, const at::Tensor& keep_bytes) {
  DropoutMask mask{nullptr, 0};
  if (keep_bytes.defined()) {
    TORCH_INTERNAL_ASSERT(keep_bytes.scalar_type() == at::kByte && keep_bytes.is_contiguous() &&
                          keep_bytes.size(0) == grad_y.size(0) && keep_bytes.size(1) % 32 == 0 &&
                          keep_bytes.size(1) >= (weight.size(1) + 7) / 8 &&
                          reinterpret_cast<uintptr_t>(keep_bytes.data_ptr()) % 16 == 0);
    mask = DropoutMask{keep_bytes.data_ptr<uint8_t>(), keep_bytes.size(1)};
  }
  return launch_gemm<RightOperand::kNContiguous>(grad_y, weight, c10::nullopt, grad_s, lora_A, weight.size(0),
                                                 weight.size(1), mask);
}

}  // namespace cuda
}  // namespace lora_ext

#else  // no sm_90a target in this build: the forward keeps cuBLAS + the expand kernel

namespace lora_ext {
namespace cuda {

bool fused_lora_gemm_usable(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t) {
  return false;
}

at::Tensor lora_gemm_operand(const at::Tensor& t, at::ScalarType, double) { return t; }

at::Tensor fused_lora_gemm(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&) {
  LORA_CHECK(false, "lora_ext: this build has no sm_90a kernels (fused_lora_gemm_usable says so)");
  return at::Tensor();
}

at::Tensor fused_multi_lora_gemm(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  LORA_CHECK(false, "lora_ext: this build has no sm_90a kernels (fused_lora_gemm_usable says so)");
  return at::Tensor();
}

bool fused_lora_grad_x_usable(const at::Tensor&, const at::Tensor&, int64_t) { return false; }

at::Tensor fused_lora_grad_x(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&) {
  LORA_CHECK(false, "lora_ext: this build has no sm_90a kernels (fused_lora_grad_x_usable says so)");
  return at::Tensor();
}

}  // namespace cuda
}  // namespace lora_ext

#endif  // LORA_EXT_HAS_SM90A
