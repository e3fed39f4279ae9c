// Multi-adapter decoding on Hopper in one launch (multi_lora.cu, launch_gather_cluster): a cluster of
// kGatherClusterBlocks blocks per token, as the single-adapter decode kernel (lora_decode.cuh).
//   block b: xa_b = Σ_{k in the b-th eighth of K} x[t, k]·A[a][:, k]        (a = the token's slot)
//   cluster: xa = Σ_b xa_b through distributed shared memory, in block order (every block gets the same bits)
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
// Needs in % 8 == 0, out % 8 == 0, 16-byte aligned x rows, stacks and y, rank ≤ 64 (multi_lora.cu checks).
#pragma once

#include <cooperative_groups.h>

#include <algorithm>

#include "async_copy.cuh"
#include "multi_lora_gather.cuh"

namespace lora_ext {
namespace cuda {

constexpr int kGatherClusterBlocks = 8;
constexpr int kGatherClusterThreads = 128;

namespace cluster_detail {

// Static shared memory per block, under the 48 KB a launch gets unasked: A's slice (rank rows × a chunk of 8-vectors
// of K), x's matching vectors, and B's rows for a chunk of this block's output columns.
constexpr int kAStageBytes = 16 * 1024;
constexpr int kBStageBytes = 24 * 1024;

// Vectors of K per chunk of A: the whole eighth at in = 4096 for r ≤ 16 (16-bit adapters).
template <typename TW, int RPAD>
constexpr int a_chunk_vectors() {
  return kAStageBytes / (RPAD * 8 * static_cast<int>(sizeof(TW)));
}

// B's rows for 8 output columns (one thread's 8-vector of y) lie contiguously: 8·rank elements, a multiple of 16
// bytes. Each such group is staged with 16 bytes of padding, so that consecutive threads' 16-byte reads start in
// different banks.
template <typename TW>
__device__ __forceinline__ int b_group_pitch(int64_t rank) {
  return static_cast<int>(8 * rank * static_cast<int64_t>(sizeof(TW))) + 16;
}

// Issues copies of `count` 16-byte pieces from contiguous global memory to shared memory, one per thread in turn.
__device__ __forceinline__ void stage_contiguous(char* shared, const char* global, int count) {
  for (int i = threadIdx.x; i < count; i += kGatherClusterThreads) copy_16_bytes_async(shared + 16 * i, global + 16 * i);
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
  __shared__ __align__(16) char a_stage[kAStageBytes];  // [j][v]: rank rows of kAChunk vectors
  __shared__ __align__(16) char x_stage[kAChunk * kXVectorBytes];
  __shared__ __align__(16) char b_stage[kBStageBytes];  // output groups of 8 columns, b_group_pitch bytes each
  __shared__ float warp_sums[kWarps][RPAD];
  __shared__ float block_partial[RPAD];
  __shared__ float xa[RPAD];
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int part = static_cast<int>(cluster.block_rank());
  const int64_t t = blockIdx.y;
  const int a = slot_of<IdT>(p.ids, t, p.adapters);
  if (a < 0) return;  // the whole cluster (one token) leaves together, before any cluster barrier

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
  const int b_pieces = (b_pitch - 16) / 16;    // 16-byte pieces per group

  // Copies x's and A's vectors [v0, v0 + n) into their stages.
  const auto stage_a = [&](int64_t v0, int n) {
    const int x_pieces = n * kXVectorBytes / 16;
    stage_contiguous(x_stage, x_row + v0 * kXVectorBytes, x_pieces);
    const int row_pieces = n * kAVectorBytes / 16;
    for (int i = threadIdx.x; i < p.rank * row_pieces; i += kGatherClusterThreads) {
      const int j = i / row_pieces, piece = i % row_pieces;
      copy_16_bytes_async(a_stage + (j * kAChunk * kAVectorBytes) + 16 * piece,
                          A_slot + (j * p.in + 8 * v0) * static_cast<int64_t>(sizeof(TW)) + 16 * piece);
    }
  };
  // Copies B's rows for output groups [g0, g0 + n) into the stage.
  const auto stage_b = [&](int64_t g0, int n) {
    for (int i = threadIdx.x; i < n * b_pieces; i += kGatherClusterThreads) {
      const int g = i / b_pieces, piece = i % b_pieces;
      copy_16_bytes_async(b_stage + g * b_pitch + 16 * piece, B_slot + (g0 + g) * (b_pitch - 16) + 16 * piece);
    }
  };

  // All of the first chunks at once: x and A for the shrink, B for the expand (none of them written by the GEMM).
  const int a_first = static_cast<int>(std::min<int64_t>(kAChunk, v_end - v_begin));
  const int b_first = static_cast<int>(std::min<int64_t>(b_chunk, g_end - g_begin));
  stage_a(v_begin, a_first);
  stage_b(g_begin, b_first);
  copy_async_wait_all();
  __syncthreads();

  // The shrink, chunk by chunk: thread i takes the chunk's vectors i, i + 128, … (16-byte shared reads, consecutive
  // threads on consecutive vectors: no bank conflicts).
  float acc[RPAD];
#pragma unroll
  for (int j = 0; j < RPAD; ++j) acc[j] = 0.f;
  for (int64_t v0 = v_begin; v0 < v_end; v0 += kAChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kAChunk, v_end - v0));
    if (v0 != v_begin) {
      __syncthreads();  // every thread is done with the previous chunk
      stage_a(v0, n);
      copy_async_wait_all();
      __syncthreads();
    }
    for (int v = threadIdx.x; v < n; v += kGatherClusterThreads) {
      float xv[8];
      load8_float(reinterpret_cast<const T*>(x_stage + v * kXVectorBytes), xv);
#pragma unroll
      for (int j = 0; j < RPAD; ++j) {
        if (j < p.rank) {
          float av[8];
          load8_float(reinterpret_cast<const TW*>(a_stage + (j * kAChunk + v) * kAVectorBytes), av);
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[j] = fmaf(xv[q], av[q], acc[j]);
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
  // This thread's first group of y, loaded now so that its latency overlaps the reduction.
  const int64_t g_first = g_begin + threadIdx.x;
  float yv[8];
  if (g_first < g_begin + b_first) load8_float(y_row + 8 * g_first, yv);

  block_sum_ranks<RPAD, kWarps>(acc, warp_sums, block_partial, p.rank);
  cluster.sync();
  for (int j = threadIdx.x; j < RPAD; j += kGatherClusterThreads) {
    float sum = 0.f;
    if (j < p.rank) {
#pragma unroll
      for (int b = 0; b < kGatherClusterBlocks; ++b) sum += cluster.map_shared_rank(block_partial, b)[j];
    }
    xa[j] = sum;
  }
  cluster.sync();  // xa complete; no block leaves while another still reads its partial

  // The expand, chunk by chunk of B: thread i updates the chunk's groups i, i + 128, … (8 columns each).
  const float s = p.scalings[a];
  for (int64_t g0 = g_begin; g0 < g_end; g0 += b_chunk) {
    const int n = static_cast<int>(std::min<int64_t>(b_chunk, g_end - g0));
    if (g0 != g_begin) {
      __syncthreads();  // every thread is done with the previous chunk
      stage_b(g0, n);
      copy_async_wait_all();
      __syncthreads();
    }
    for (int g = threadIdx.x; g < n; g += kGatherClusterThreads) {
      if (g0 + g != g_first) load8_float(y_row + 8 * (g0 + g), yv);
      const char* group = b_stage + g * b_pitch;
      float out[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        float sum = 0.f;
        const TW* row = reinterpret_cast<const TW*>(group) + q * p.rank;
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
      store8_float(y_row + 8 * (g0 + g), out);
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled for an architecture without clusters: the launcher never launches it there
#endif
}

}  // namespace cuda
}  // namespace lora_ext
