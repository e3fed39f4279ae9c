// The general shrink: a strided, tiled matrix product into float32,
//
//   C[m, n] = alpha · Σ_k keep(m, k) · A[m, k] · B[k, n]
//
// with each operand addressed through two element strides, so transposes, non-contiguous and
// offset views cost nothing and no operand is ever copied. It computes x·Aᵀ and dy·B whenever the
// tensor-core shrink (lora_shrink.cuh) cannot: float32 activations, float32 adapters, unaligned rows,
// r > 64, decoding-sized inputs, and the last tokens % 16 rows.
//
// Grid: x over M tiles, y over N tiles, z over K splits. Block: 256 threads, a BM × BN tile of C, each
// thread TM × TN outputs strided by BM/TM and BN/TN (so stores and shared-memory reads are
// consecutive across a warp). Operands are staged through shared memory in float32, BK = 16 deep.
// Bytes moved: each A tile is read once per N tile, each B tile once per M tile; C is read (accumulate
// mode) and written once. Arithmetic in float32 FMAs: this is the correct, general first version;
// docs/perf-notes.md tracks the faster specialised kernels that replace it on the hot shapes.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "../dropout_mask.h"

namespace lora_ext {
namespace cuda {

enum class DropoutAt {
  kNone,
  kOperandA,  // A[m, k] is x[row = m + dropout_row_offset, col = k]
};

struct GemmParams {
  const void* a;
  int64_t a_stride_m, a_stride_k;
  const void* b;
  int64_t b_stride_k, b_stride_n;
  void* c;
  int64_t c_stride_m, c_stride_n;
  int64_t c_stride_split;  // distance between the float32 partial results of K splits
  int64_t m, n, k;
  int64_t k_per_split;
  float alpha;
  const int64_t* dropout_seed;  // device pointer, read at run time (CUDA-graph safe)
  uint32_t dropout_threshold;
  int64_t dropout_row_offset;  // the row of x that row 0 of A is (A may be a tail of x)
};

template <typename T>
__device__ __forceinline__ float load_as_float(const void* base, int64_t offset) {
  return static_cast<float>(static_cast<const T*>(base)[offset]);
}

template <int BM, int BN, int TM, int TN, typename TA, typename TB, typename TC, DropoutAt DROPOUT>
__global__ void __launch_bounds__(256) lora_gemm_kernel(const GemmParams p) {
  constexpr int kThreads = 256;
  constexpr int BK = 16;
  constexpr int kThreadsN = BN / TN;
  static_assert((BM / TM) * (BN / TN) == kThreads, "the tile must give every thread one micro-tile");

  __shared__ float a_tile[BK][BM + 1];
  __shared__ float b_tile[BK][BN + 1];

  const int tid = threadIdx.x;
  const int thread_n = tid % kThreadsN;
  const int thread_m = tid / kThreadsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = min(p.k, k_begin + p.k_per_split);

  uint64_t seed = 0;
  if constexpr (DROPOUT != DropoutAt::kNone) seed = static_cast<uint64_t>(*p.dropout_seed);

  // Walk each operand tile along its unit-stride dimension, so a warp's loads are consecutive.
  const bool a_walk_k = p.a_stride_k == 1;
  const bool b_walk_n = p.b_stride_n == 1;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int idx = tid; idx < BM * BK; idx += kThreads) {
      const int tile_m = a_walk_k ? idx / BK : idx % BM;
      const int tile_k = a_walk_k ? idx % BK : idx / BM;
      const int64_t row = m0 + tile_m, kk = k0 + tile_k;
      float value = 0.f;
      if (row < p.m && kk < k_end) {
        value = load_as_float<TA>(p.a, row * p.a_stride_m + kk * p.a_stride_k);
        if constexpr (DROPOUT == DropoutAt::kOperandA) {
          if (!dropout_keep(seed, row + p.dropout_row_offset, kk, p.dropout_threshold)) value = 0.f;
        }
      }
      a_tile[tile_k][tile_m] = value;
    }
    for (int idx = tid; idx < BN * BK; idx += kThreads) {
      const int tile_n = b_walk_n ? idx % BN : idx / BK;
      const int tile_k = b_walk_n ? idx / BN : idx % BK;
      const int64_t col = n0 + tile_n, kk = k0 + tile_k;
      b_tile[tile_k][tile_n] =
          (col < p.n && kk < k_end) ? load_as_float<TB>(p.b, kk * p.b_stride_k + col * p.b_stride_n) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a_frag[TM], b_frag[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a_frag[i] = a_tile[kk][thread_m + i * (BM / TM)];
#pragma unroll
      for (int j = 0; j < TN; ++j) b_frag[j] = b_tile[kk][thread_n + j * kThreadsN];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a_frag[i], b_frag[j], acc[i][j]);
    }
    __syncthreads();
  }

  TC* c = static_cast<TC*>(p.c) + static_cast<int64_t>(blockIdx.z) * p.c_stride_split;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = m0 + thread_m + i * (BM / TM);
    if (row >= p.m) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = n0 + thread_n + j * kThreadsN;
      if (col >= p.n) continue;
      const float value = p.alpha * acc[i][j];
      TC* out = c + row * p.c_stride_m + col * p.c_stride_n;
      *out = static_cast<TC>(value);
    }
  }
}

}  // namespace cuda
}  // namespace lora_ext
