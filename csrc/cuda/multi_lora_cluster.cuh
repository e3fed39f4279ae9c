// Multi-adapter decoding on Hopper in one launch (multi_lora.cu, launch_gather_cluster): a cluster of
// kGatherClusterBlocks blocks per token, as the single-adapter decode kernel (lora_decode.cuh).
//   block b: xa_b = Σ_{k in the b-th eighth of K} x[t, k]·A[a][:, k]        (a = the token's slot)
//   cluster: xa = Σ_b xa_b in block order (every block gets the same bits), each block's xa_b stored into its
//            peers' shared memory by st.async, completing on their mbarriers (cluster_barriers.cuh)
//   block b: y[t, o] = round(y[t, o] + s[a]·Σ_j xa[j]·B[a][o, j]) for the b-th eighth of y's columns
// A[a] and B[a] are read once per token, each SM reading an eighth of them.
//
// Why the operands go through shared memory: the kernel is latency-bound (a block reads ≈ 33 KB at in = out = 4096,
// r = 16), so what counts is how many round trips to memory wait on each other. Loaded into registers, each
// thread's 16 rows of A and 16 vectors of B were issued a few at a time, ptxas interleaving them with the FMAs that
// consume them (and after an unrelated change to MultiLoraParams in 32dd5f7, one at a time: +5 µs per call; see
// docs/perf-notes.md v17). Here every block issues its whole slice of x, A[a] and B[a] as cp.async copies at once,
// before it waits for the base GEMM: one round trip for all of them (per chunk, where a slice exceeds its stage).
//
// What is left is a chain of dependent steps with few warps per SM (ncu: ≈ 9 µs at 32 tokens, bound by instruction
// latency), so each step is kept short: the shrink runs on tensor cores for 16-bit operands (shrink_chunk_mma), and
// the expand spreads half an output group over each of the block's threads.
//
// Needs in % 8 == 0, out % 8 == 0, 16-byte aligned x rows, stacks and y, rank ≤ 64 (multi_lora.cu checks).
#pragma once

#include <cooperative_groups.h>

#include <algorithm>

#include "async_copy.cuh"
#include "cluster_barriers.cuh"
#include "mma_sync.cuh"
#include "multi_lora_gather.cuh"

namespace lora_ext {
namespace cuda {

constexpr int kGatherClusterBlocks = 8;
constexpr int kGatherClusterThreads = 128;

namespace cluster_detail {

// Static shared memory per block, under the 48 KB a launch gets unasked: A's slice (rank rows × a chunk of 8-vectors
// of K, each row padded by kARowPadding bytes), x's matching vectors, and B's rows for a chunk of this block's output
// columns.
constexpr int kAStageBytes = 16 * 1024;
constexpr int kBStageBytes = 24 * 1024;
// Rows of A's stage are a multiple of 128 bytes long: padded by 64 bytes, rows g and g + 1 (read by one 8-lane phase
// of the tensor-core shrink) fall in different halves of the banks.
constexpr int kARowPadding = 64;

// Vectors of K per chunk of A: the whole eighth at in = 4096 for r ≤ 16 (16-bit adapters).
template <typename TW, int RPAD>
constexpr int a_chunk_vectors() {
  return kAStageBytes / (RPAD * 8 * static_cast<int>(sizeof(TW)));
}

// B's rows for one output group of 8 columns lie contiguously: 8·rank elements, a multiple of 16 bytes. Each group
// is staged with 16 bytes of padding, so that consecutive threads' 16-byte reads (consecutive groups) start in
// different banks.
template <typename TW>
__device__ __forceinline__ int b_group_pitch(int64_t rank) {
  return static_cast<int>(8 * rank * static_cast<int64_t>(sizeof(TW))) + 16;
}

// Issues copies of `rows` rows of `pieces` 16-byte pieces each (row r from src + r·src_row_bytes to dst +
// r·dst_row_bytes), the block's threads taking the pieces in turn. The (row, piece) of each thread's next copy is
// stepped without a division per copy.
__device__ __forceinline__ void stage_rows(char* dst, int64_t dst_row_bytes, const char* src, int64_t src_row_bytes,
                                           int rows, int pieces) {
  if (rows <= 0 || pieces <= 0) return;
  constexpr int kThreads = kGatherClusterThreads;
  const int step_rows = kThreads / pieces, step_pieces = kThreads % pieces;
  int row = threadIdx.x / pieces, piece = threadIdx.x % pieces;
  while (row < rows) {
    copy_16_bytes_async(dst + row * dst_row_bytes + 16 * piece, src + row * src_row_bytes + 16 * piece);
    row += step_rows;
    piece += step_pieces;
    if (piece >= pieces) piece -= pieces, ++row;
  }
}

// 16-bit x and adapters: this warp's share of x·A[a]ᵀ over a staged chunk of n 8-vectors of K, on tensor cores
// (mma m16n8k16: A's rows as M, 16 ranks per tile; the token as column 0 of N, the other columns zero). Warp w takes
// the chunk's 32-wide pieces w, w + 4, …; K is permuted inside each piece as in lora_decode_gemv.cuh (lane (g, q)
// reads 16 contiguous bytes of rows g and g + 8 and of x; both operands use the same order). Products are exact,
// summed in float32 by the tensor cores: deterministic, but not bit for bit the FMA path's sums (nor the two-kernel
// gather path's, which serves where clusters cannot run).
template <typename T, int RPAD>
__device__ __forceinline__ void shrink_chunk_mma(float (&acc)[RPAD / 16][4], const char* a_stage, int64_t a_row_bytes,
                                                 const char* x_stage, int n, int64_t rank) {
  static_assert(sizeof(T) == 2, "16-byte vectors of 8 elements");
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int c = threadIdx.x / 32; 4 * c < n; c += kGatherClusterThreads / 32) {
    const int v = 4 * c + q;
    const bool in_range = v < n;
    const uint4 xv = g == 0 && in_range ? *reinterpret_cast<const uint4*>(x_stage + 16 * v) : zero;
#pragma unroll
    for (int rt = 0; rt < RPAD / 16; ++rt) {
      const int row = 16 * rt + g;
      const uint4 lo = in_range && row < rank ? *reinterpret_cast<const uint4*>(a_stage + row * a_row_bytes + 16 * v)
                                              : zero;
      const uint4 hi = in_range && row + 8 < rank
                           ? *reinterpret_cast<const uint4*>(a_stage + (row + 8) * a_row_bytes + 16 * v)
                           : zero;
      mma_16x8x16<T>(acc[rt], {lo.x, hi.x, lo.y, hi.y}, xv.x, xv.y);
      mma_16x8x16<T>(acc[rt], {lo.z, hi.z, lo.w, hi.w}, xv.z, xv.w);
    }
  }
}

// Four consecutive elements as float, and back (8 bytes of 16-bit elements, 16 of float).
template <typename T>
__device__ __forceinline__ void load4_float(const T* src, float (&out)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    union {
      uint2 bits;
      T v[4];
    } pack;
    pack.bits = *reinterpret_cast<const uint2*>(src);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = static_cast<float>(pack.v[i]);
  }
}
template <typename T>
__device__ __forceinline__ void store4_float(T* dst, const float (&values)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(dst) = make_float4(values[0], values[1], values[2], values[3]);
  } else {
    union {
      uint2 bits;
      T v[4];
    } pack;
#pragma unroll
    for (int i = 0; i < 4; ++i) pack.v[i] = T(values[i]);
    *reinterpret_cast<uint2*>(dst) = pack.bits;
  }
}

}  // namespace cluster_detail

// Launched with a cluster dimension of kGatherClusterBlocks along x, grid (kGatherClusterBlocks, tokens).
template <typename T, typename TW, typename IdT, int RPAD, bool RANK_VECTORS>
__global__ void __launch_bounds__(kGatherClusterThreads) multi_lora_gather_cluster_kernel(const MultiLoraParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace cluster_detail;
  constexpr int kWarps = kGatherClusterThreads / 32;
  constexpr int kAChunk = a_chunk_vectors<TW, RPAD>();
  constexpr int kXVectorBytes = 8 * sizeof(T), kAVectorBytes = 8 * sizeof(TW);
  constexpr int64_t kARowBytes = int64_t{kAChunk} * kAVectorBytes + kARowPadding;
  // 16-bit x with adapters of its type: the shrink on tensor cores.
  constexpr bool kMmaShrink = std::is_same_v<T, TW> && !std::is_same_v<T, float>;
  // Single-adapter decoding (lora_forward): slot 0 for every token, the scaling a value, xa written out.
  constexpr bool kOneAdapter = std::is_same_v<IdT, OneAdapter>;
  __shared__ __align__(16) char a_stage[RPAD * kARowBytes];  // [j][v]: rank rows of kAChunk vectors
  __shared__ __align__(16) char x_stage[kAChunk * kXVectorBytes];
  __shared__ __align__(16) char b_stage[kBStageBytes];  // output groups of 8 columns, b_group_pitch bytes each
  __shared__ float warp_sums[kWarps][RPAD];
  // Every block's partial sums, row b from block b: this block's own row written here, the peers' by st.async.
  __shared__ __align__(16) float partials[kGatherClusterBlocks][RPAD];
  __shared__ __align__(8) uint64_t partials_ready;
  __shared__ float xa[RPAD];
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int part = static_cast<int>(cluster.block_rank());
  const int64_t t = blockIdx.y;
  const int a = slot_of<IdT>(p.ids, t, p.adapters);
  if (a < 0) {  // the whole cluster (one token) leaves together, before any cluster barrier
    // A dependent launch still waits: a kernel launched as this one's dependent is ordered after the base GEMM only
    // through this kernel's wait, and would otherwise miss it where every token is on the base alone.
    if (p.dependent_launch) wait_for_preceding_kernel();
    return;
  }
  if (threadIdx.x == 0) {
    mbarrier_init(&partials_ready, 1);
    fence_barrier_init();
  }
  cluster_arrive_relaxed();  // publishes the init to the peers; waited for only before the first push

  // This block's share: 8-vectors [v_begin, v_end) of K, and output groups [g_begin, g_end) of 8 columns.
  const int64_t vectors = p.in / 8, v_begin = vectors * part / kGatherClusterBlocks;
  const int64_t v_end = vectors * (part + 1) / kGatherClusterBlocks;
  const int64_t groups = p.out / 8, g_begin = groups * part / kGatherClusterBlocks;
  const int64_t g_end = groups * (part + 1) / kGatherClusterBlocks;
  const char* x_row = reinterpret_cast<const char*>(static_cast<const T*>(p.x) + t * p.x_stride);
  const char* A_slot = reinterpret_cast<const char*>(static_cast<const TW*>(p.lora_A) + int64_t{a} * p.rank * p.in);
  const char* B_slot = reinterpret_cast<const char*>(static_cast<const TW*>(p.lora_B) + int64_t{a} * p.out * p.rank);
  T* y_row = static_cast<T*>(p.y) + t * p.out;
  const int b_pitch = b_group_pitch<TW>(p.rank);
  const int b_chunk = kBStageBytes / b_pitch;  // output groups per chunk of B (≥ 11: r = 64, float adapters)

  // Copies x's and A's vectors [v0, v0 + n) into their stages.
  const auto stage_x_and_a = [&](int64_t v0, int n) {
    stage_rows(x_stage, 0, x_row + v0 * kXVectorBytes, 0, 1, n * kXVectorBytes / 16);
    stage_rows(a_stage, kARowBytes, A_slot + v0 * kAVectorBytes, p.in * static_cast<int64_t>(sizeof(TW)),
               static_cast<int>(p.rank), n * kAVectorBytes / 16);
  };
  // Copies B's rows for output groups [g0, g0 + n) into the stage.
  const auto stage_b = [&](int64_t g0, int n) {
    stage_rows(b_stage, b_pitch, B_slot + g0 * (b_pitch - 16), b_pitch - 16, n, (b_pitch - 16) / 16);
  };

  // All of the first chunks at once: x and A for the shrink, B for the expand (none of them written by the GEMM),
  // in two groups, so that the shrink waits for x and A only.
  const int a_first = static_cast<int>(std::min<int64_t>(kAChunk, v_end - v_begin));
  const int b_first = static_cast<int>(std::min<int64_t>(b_chunk, g_end - g_begin));
  stage_x_and_a(v_begin, a_first);
  copy_async_commit();
  stage_b(g_begin, b_first);
  copy_async_commit();
  copy_async_wait_pending<1>();
  __syncthreads();

  // The shrink, chunk by chunk: on tensor cores (kMmaShrink), or by FMAs, thread i taking the chunk's vectors i,
  // i + 128, …. (Branches around shared-memory reads cost little here, unlike around global loads, where each one
  // waits for the round trip before it: multi_lora_gather.cuh.)
  float acc[RPAD];
  float mma_acc[RPAD / 16][4];
#pragma unroll
  for (int j = 0; j < RPAD; ++j) acc[j] = 0.f;
#pragma unroll
  for (int rt = 0; rt < RPAD / 16; ++rt) mma_acc[rt][0] = mma_acc[rt][1] = mma_acc[rt][2] = mma_acc[rt][3] = 0.f;
  for (int64_t v0 = v_begin; v0 < v_end; v0 += kAChunk) {
    const int n_vectors = static_cast<int>(std::min<int64_t>(kAChunk, v_end - v0));
    if (v0 != v_begin) {
      __syncthreads();  // every thread is done with the previous chunk
      stage_x_and_a(v0, n_vectors);
      copy_async_wait_all();
      __syncthreads();
    }
    if constexpr (kMmaShrink) {
      shrink_chunk_mma<T, RPAD>(mma_acc, a_stage, kARowBytes, x_stage, n_vectors, p.rank);
    } else {
      for (int v = threadIdx.x; v < n_vectors; v += kGatherClusterThreads) {
        float xv[8];
        load8_float(reinterpret_cast<const T*>(x_stage + v * kXVectorBytes), xv);
#pragma unroll
        for (int j = 0; j < RPAD; ++j) {
          if (j < p.rank) {
            float av[8];
            load8_float(reinterpret_cast<const TW*>(a_stage + j * kARowBytes + v * kAVectorBytes), av);
#pragma unroll
            for (int q = 0; q < 8; ++q) acc[j] = fmaf(xv[q], av[q], acc[j]);
          }
        }
      }
    }
  }

  // A dependent launch: y (and the scalings) may come from the kernel just ahead (the base GEMM), so they are read
  // only after it (multi_lora.cu). The id, x, A[a] and B[a], read above, were written before the GEMM started: an
  // ordinary launch (ATen's cuBLAS call) starts only once all earlier work is done. Were the GEMM itself a
  // programmatic dependent that released its successor before its own wait, those reads would need to move below
  // this wait too.
  if (p.dependent_launch) wait_for_preceding_kernel();
  copy_async_wait_all();  // B's first chunk too, visible to all after the barriers below

  // The expand's items: the two halves (4 columns each) of every output group of a chunk of n groups, halves 0 of all
  // groups first, so that consecutive threads read consecutive groups of the stage (no bank conflicts). This
  // thread's first item's 4 values of y are loaded now, so that their latency overlaps the reduction.
  struct Item {
    int group;  // in the chunk
    int half;
  };
  const auto item_of = [](int index, int n) { return index < n ? Item{index, 0} : Item{index - n, 1}; };
  const auto first_column = [](int64_t g0, Item item) { return 8 * (g0 + item.group) + 4 * item.half; };
  float yv[4];
  if (threadIdx.x < 2 * b_first) load4_float(y_row + first_column(g_begin, item_of(threadIdx.x, b_first)), yv);

  // This block's partial sums of x·A[a]ᵀ, rank by rank, in a fixed order (zeros past the rank: all RPAD are pushed).
  if constexpr (kMmaShrink) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane % 4 == 0) {  // column 0 of the accumulators (the token): rows g and g + 8 of each rank tile
#pragma unroll
      for (int rt = 0; rt < RPAD / 16; ++rt) {
        warp_sums[warp][16 * rt + lane / 4] = mma_acc[rt][0];
        warp_sums[warp][16 * rt + lane / 4 + 8] = mma_acc[rt][2];
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < RPAD; j += kGatherClusterThreads) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][j];
      partials[part][j] = j < p.rank ? sum : 0.f;
    }
  } else {
    block_sum_ranks<RPAD, kWarps>(acc, warp_sums, partials[part], p.rank);
    for (int j = static_cast<int>(p.rank) + threadIdx.x; j < RPAD; j += kGatherClusterThreads) partials[part][j] = 0.f;
  }
  __syncthreads();

  // This block's row of partials into the same row of every peer's (st.async is for peers; its own is written
  // above), each block starting with the next rank so that no block is every block's first destination; then, in
  // every block, the same sum in block order.
  cluster_wait();  // every block's barrier is initialised
  constexpr int kVectors = RPAD / 4, kPeers = kGatherClusterBlocks - 1;
  if (threadIdx.x == 0) mbarrier_arrive_expect_bytes(&partials_ready, kPeers * RPAD * sizeof(float));
  for (int i = threadIdx.x; i < kPeers * kVectors; i += kGatherClusterThreads) {
    const int destination = (part + 1 + i / kVectors) % kGatherClusterBlocks, vector = i % kVectors;
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = partials[part][4 * vector + e];
    store_4_floats_async(&partials[part][4 * vector], &partials_ready, static_cast<uint32_t>(destination), v);
  }
  mbarrier_wait_cluster(&partials_ready, 0);  // every peer's bytes have landed
  for (int j = threadIdx.x; j < RPAD; j += kGatherClusterThreads) {
    float sum = 0.f;
#pragma unroll
    for (int b = 0; b < kGatherClusterBlocks; ++b) sum += partials[b][j];
    xa[j] = sum;
    if constexpr (kOneAdapter) {
      if (part == 0 && j < p.rank) p.lora_activation[t * p.rank + j] = sum;  // lora_forward's saved activation
    }
  }
  __syncthreads();

  // The expand, chunk by chunk of B.
  const float s = kOneAdapter ? p.one_adapter_scaling : p.scalings[a];
  for (int64_t g0 = g_begin; g0 < g_end; g0 += b_chunk) {
    const int n_groups = static_cast<int>(std::min<int64_t>(b_chunk, g_end - g0));
    if (g0 != g_begin) {
      __syncthreads();  // every thread is done with the previous chunk
      stage_b(g0, n_groups);
      copy_async_wait_all();
      __syncthreads();
    }
    for (int index = threadIdx.x; index < 2 * n_groups; index += kGatherClusterThreads) {
      const Item item = item_of(index, n_groups);
      const int64_t column = first_column(g0, item);
      if (g0 != g_begin || index != threadIdx.x) load4_float(y_row + column, yv);
      // The item's 4 rows of B: rank elements each, in the group's staged rows.
      const TW* rows = reinterpret_cast<const TW*>(b_stage + item.group * b_pitch) + 4 * item.half * p.rank;
      float out[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float sum = 0.f;
        const TW* row = rows + q * p.rank;
        if constexpr (RANK_VECTORS) {
#pragma unroll
          for (int j0 = 0; j0 < RPAD; j0 += 8) {
            if (j0 < p.rank) {
              float bv[8];
              load8_float(row + j0, bv);
#pragma unroll
              for (int jj = 0; jj < 8; ++jj) sum = fmaf(xa[j0 + jj], bv[jj], sum);
            }
          }
        } else {
          for (int j = 0; j < p.rank; ++j) sum = fmaf(xa[j], static_cast<float>(row[j]), sum);
        }
        // s·Σ rounded, then added and rounded once into y's dtype, as the CPU kernel does (no FMA contraction).
        out[q] = __fadd_rn(yv[q], __fmul_rn(s, sum));
      }
      store4_float(y_row + column, out);
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled for an architecture without clusters: the launcher never launches it there
#endif
}

}  // namespace cuda
}  // namespace lora_ext
