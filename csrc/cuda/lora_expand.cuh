// expand-add: C[m, n] += alpha · Σ_j L[m, j] · R[n, j]  (· keep(m, n) with dropout on the output)
//
// The memory-bound fold of a rank-r product into a large output, used for
//   forward  y  += s·xa·Bᵀ        (L = xa, float32; R = B)
//   backward dx += keep·dxa·A/(1−p) (L = dxa; R = Aᵀ; dropout on the output)
//   merge    W  ±= s·B·A           (L = B; R = Aᵀ)
// The output is read once and written once, 8 consecutive elements (16 bytes for 16-bit types) per
// thread where its rows are aligned, and its loads are issued before the rank-r sums so they overlap.
// Grid: x over 32-row tiles of C, y over 256-column tiles. Block: 256 threads = 8 rows of threads × 32
// lanes; each thread owns 4 rows × 8 consecutive columns. L and R are staged through shared memory in
// float32, 16 ranks at a time. FLOPs: 2·M·N·r in float32 FMAs (r = 16 at 8192 × 4096: 1.1 GFLOP).
#pragma once

#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../dropout_mask.h"

namespace lora_ext {
namespace cuda {

struct ExpandParams {
  const void* left;  // L (M × r)
  int64_t left_stride_m, left_stride_j;
  const void* right;  // R (N × r)
  int64_t right_stride_n, right_stride_j;
  void* out;  // C (M × N)
  int64_t out_stride_m, out_stride_n;
  int64_t m, n, rank;
  float alpha;
  bool out_vectorizable;  // unit column stride, rows and base 16-byte aligned
  // The tensor-core expand's rank-contiguous L and R: 16-byte loads of 8 ranks where rows and base are 16-byte
  // aligned and r % 8 == 0, element loads (zeros past r) otherwise.
  bool left_vector_rows, right_vector_rows;
  const int64_t* dropout_seed;
  uint32_t dropout_threshold;
};

namespace expand_detail {
constexpr int kRowsPerThread = 4;
constexpr int kColsPerThread = 8;
constexpr int kTileM = 8 * kRowsPerThread;    // 32
constexpr int kTileN = 32 * kColsPerThread;   // 256
constexpr int kRankChunk = 16;

// Eight consecutive output elements as one 16-byte (or two, for float) vector.
template <typename T>
struct alignas(16) Vec8 {
  T v[8];
};
}  // namespace expand_detail

template <typename TL, typename TR, typename TC, bool DROPOUT>
__global__ void __launch_bounds__(256) lora_expand_add_kernel(const ExpandParams p) {
  using namespace expand_detail;
  __shared__ float left_tile[kTileM][kRankChunk + 1];
  __shared__ __align__(16) float right_tile[kRankChunk][kTileN];

  const int lane = threadIdx.x % 32;
  const int thread_row = threadIdx.x / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t col = n0 + lane * kColsPerThread;
  const bool full_vector = p.out_vectorizable && col + kColsPerThread <= p.n;

  // Issue the output loads first: they are the bytes that bound this kernel.
  Vec8<TC> old[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = m0 + thread_row + i * 8;
    if (row < p.m && full_vector) {
      old[i] = *reinterpret_cast<const Vec8<TC>*>(static_cast<const TC*>(p.out) + row * p.out_stride_m + col);
    }
  }

  float acc[kRowsPerThread][kColsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int v = 0; v < kColsPerThread; ++v) acc[i][v] = 0.f;

  const bool right_walk_n = p.right_stride_n == 1;
  for (int64_t j0 = 0; j0 < p.rank; j0 += kRankChunk) {
    for (int idx = threadIdx.x; idx < kTileM * kRankChunk; idx += 256) {
      const int tile_m = idx / kRankChunk, tile_j = idx % kRankChunk;
      const int64_t row = m0 + tile_m, j = j0 + tile_j;
      left_tile[tile_m][tile_j] = (row < p.m && j < p.rank)
          ? static_cast<float>(static_cast<const TL*>(p.left)[row * p.left_stride_m + j * p.left_stride_j])
          : 0.f;
    }
    for (int idx = threadIdx.x; idx < kTileN * kRankChunk; idx += 256) {
      const int tile_n = right_walk_n ? idx % kTileN : idx / kRankChunk;
      const int tile_j = right_walk_n ? idx / kTileN : idx % kRankChunk;
      const int64_t n = n0 + tile_n, j = j0 + tile_j;
      right_tile[tile_j][tile_n] = (n < p.n && j < p.rank)
          ? static_cast<float>(static_cast<const TR*>(p.right)[n * p.right_stride_n + j * p.right_stride_j])
          : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kRankChunk; ++jj) {
      const float4 r_lo = *reinterpret_cast<const float4*>(&right_tile[jj][lane * kColsPerThread]);
      const float4 r_hi = *reinterpret_cast<const float4*>(&right_tile[jj][lane * kColsPerThread + 4]);
      const float r[kColsPerThread] = {r_lo.x, r_lo.y, r_lo.z, r_lo.w, r_hi.x, r_hi.y, r_hi.z, r_hi.w};
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float l = left_tile[thread_row + i * 8][jj];
#pragma unroll
        for (int v = 0; v < kColsPerThread; ++v) acc[i][v] = fmaf(l, r[v], acc[i][v]);
      }
    }
    __syncthreads();
  }

  uint64_t seed = 0;
  if constexpr (DROPOUT) seed = static_cast<uint64_t>(*p.dropout_seed);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = m0 + thread_row + i * 8;
    if (row >= p.m) continue;
    if (full_vector) {
      Vec8<TC> updated;
#pragma unroll
      for (int v = 0; v < kColsPerThread; ++v) {
        float delta = p.alpha * acc[i][v];
        if constexpr (DROPOUT) {
          if (!dropout_keep(seed, row, col + v, p.dropout_threshold)) delta = 0.f;
        }
        updated.v[v] = static_cast<TC>(static_cast<float>(old[i].v[v]) + delta);
      }
      *reinterpret_cast<Vec8<TC>*>(static_cast<TC*>(p.out) + row * p.out_stride_m + col) = updated;
    } else {
#pragma unroll
      for (int v = 0; v < kColsPerThread; ++v) {
        if (col + v >= p.n) break;
        float delta = p.alpha * acc[i][v];
        if constexpr (DROPOUT) {
          if (!dropout_keep(seed, row, col + v, p.dropout_threshold)) delta = 0.f;
        }
        TC* out = static_cast<TC*>(p.out) + row * p.out_stride_m + (col + v) * p.out_stride_n;
        *out = static_cast<TC>(static_cast<float>(*out) + delta);
      }
    }
  }
}

// C += alpha · L·Rᵀ (· keep). c: (M × N) of any strides; left: (M × r); right: (N × r).
template <typename TL, typename TR, typename TC, bool DROPOUT>
void expand_add(const at::Tensor& c, const at::Tensor& left, const at::Tensor& right, double alpha,
                const int64_t* dropout_seed = nullptr, uint32_t dropout_threshold = 0) {
  using namespace expand_detail;
  ExpandParams p{};
  p.left = left.data_ptr();
  p.left_stride_m = left.stride(0);
  p.left_stride_j = left.stride(1);
  p.right = right.data_ptr();
  p.right_stride_n = right.stride(0);
  p.right_stride_j = right.stride(1);
  p.out = c.data_ptr();
  p.out_stride_m = c.stride(0);
  p.out_stride_n = c.stride(1);
  p.m = c.size(0);
  p.n = c.size(1);
  p.rank = left.size(1);
  p.alpha = static_cast<float>(alpha);
  const int64_t elements_per_16_bytes = 16 / static_cast<int64_t>(sizeof(TC));
  p.out_vectorizable = p.out_stride_n == 1 && (p.m <= 1 || p.out_stride_m % 8 == 0) &&
                       reinterpret_cast<uintptr_t>(p.out) % 16 == 0 && elements_per_16_bytes <= 8;
  p.dropout_seed = dropout_seed;
  p.dropout_threshold = dropout_threshold;
  if (p.m == 0 || p.n == 0) return;
  const int64_t tiles_m = (p.m + kTileM - 1) / kTileM, tiles_n = (p.n + kTileN - 1) / kTileN;
  LORA_CHECK(tiles_n <= 65535, "lora_ext: output too wide for the launch grid (", p.n, " columns)");
  LORA_CHECK(tiles_m <= std::numeric_limits<int32_t>::max(), "lora_ext: too many rows (", p.m, ")");
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n));
  lora_expand_add_kernel<TL, TR, TC, DROPOUT><<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lora_ext
