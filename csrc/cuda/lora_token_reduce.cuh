// token-reduce: out[c, j] = alpha · Σ_t keep(t, c) · M[t, c] · R[t, j]   (a sum over tokens)
//
// The two adapter gradients, each one pass over a (tokens × features) tensor:
//   dB  = s · dyᵀ·xa            (M = dy, C = out_features, R = xa)
//   dAᵀ = dropout(x)ᵀ·dxa        (M = x,  C = in_features,  R = dxa; dropout on M)
// Grid: x over 512-column slabs of M, y over token splits, z over 16-wide chunks of r. Block: 8 warps,
// each lane owning 2 adjacent columns (a warp reads 128 contiguous bytes of a 16-bit row). The block
// stages 32 rows of R at a time in shared memory, which every warp reads by broadcast. Each split
// writes float32 partials (splits × C × r) that a fixed-order sum reduces, so results repeat bit for
// bit. Bytes: M read once; R read once per column slab; partials 4·splits·C·r.
#pragma once

#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../dropout_mask.h"

namespace lora_ext {
namespace cuda {

struct TokenReduceParams {
  const void* matrix;  // M (tokens × C)
  int64_t matrix_stride_t, matrix_stride_c;
  const float* right;  // R (tokens × r), contiguous float32
  float* partials;     // (splits × C × r), contiguous
  int64_t tokens, columns, rank;
  int64_t tokens_per_split;
  float alpha;
  bool pair_loads;  // unit column stride and even row stride/base: two columns in one load
  const int64_t* dropout_seed;
  uint32_t dropout_threshold;
  // With dropout, where the tensor-core kernel also writes the keep bytes it draws (dropout_keep_bytes.cuh), or nullptr.
  uint8_t* keep_bytes;
  int64_t keep_pitch;
};

namespace token_reduce_detail {
constexpr int kWarps = 8;
constexpr int kColsPerLane = 2;
constexpr int kSlab = kWarps * 32 * kColsPerLane;  // 512 columns
constexpr int kRankChunk = 16;
constexpr int kTokenTile = 32;

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};
}  // namespace token_reduce_detail

template <typename TM, bool DROPOUT>
__global__ void __launch_bounds__(256) lora_token_reduce_kernel(const TokenReduceParams p) {
  using namespace token_reduce_detail;
  __shared__ float right_tile[kTokenTile][kRankChunk];

  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSlab + threadIdx.x * kColsPerLane;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * p.tokens_per_split;
  const int64_t t_end = min(p.tokens, t_begin + p.tokens_per_split);
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * kRankChunk;
  const bool pair = p.pair_loads && col + 1 < p.columns;

  uint64_t seed = 0;
  if constexpr (DROPOUT) seed = static_cast<uint64_t>(*p.dropout_seed);

  float acc[kColsPerLane][kRankChunk];
#pragma unroll
  for (int c = 0; c < kColsPerLane; ++c)
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) acc[c][j] = 0.f;

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokenTile) {
    for (int idx = threadIdx.x; idx < kTokenTile * kRankChunk; idx += 256) {
      const int tile_t = idx / kRankChunk, tile_j = idx % kRankChunk;
      const int64_t t = t0 + tile_t, j = j0 + tile_j;
      right_tile[tile_t][tile_j] = (t < t_end && j < p.rank) ? p.right[t * p.rank + j] : 0.f;
    }
    __syncthreads();
    const int rows = static_cast<int>(t_end - t0 < kTokenTile ? t_end - t0 : kTokenTile);
#pragma unroll 4
    for (int tt = 0; tt < rows; ++tt) {
      const int64_t t = t0 + tt;
      float m[kColsPerLane] = {0.f, 0.f};
      const TM* row_ptr = static_cast<const TM*>(p.matrix) + t * p.matrix_stride_t;
      if (pair) {
        const Pair<TM> two = *reinterpret_cast<const Pair<TM>*>(row_ptr + col);
        m[0] = static_cast<float>(two.v[0]);
        m[1] = static_cast<float>(two.v[1]);
      } else {
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c) {
          if (col + c < p.columns) m[c] = static_cast<float>(row_ptr[(col + c) * p.matrix_stride_c]);
        }
      }
      if constexpr (DROPOUT) {
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c) {
          if (!dropout_keep(seed, t, col + c, p.dropout_threshold)) m[c] = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) {
        const float r = right_tile[tt][j];
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c) acc[c][j] = fmaf(m[c], r, acc[c][j]);
      }
    }
    __syncthreads();
  }

  float* out = p.partials + static_cast<int64_t>(blockIdx.y) * p.columns * p.rank;
#pragma unroll
  for (int c = 0; c < kColsPerLane; ++c) {
    if (col + c >= p.columns) continue;
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) {
      if (j0 + j < p.rank) out[(col + c) * p.rank + j0 + j] = p.alpha * acc[c][j];
    }
  }
}

// out (C × r, float32, contiguous) = alpha · Σ_t keep · M[t, :]ᵀ R[t, :]; matrix: (tokens × C); right: (tokens × r).
template <typename TM, bool DROPOUT>
void token_reduce(at::Tensor& out, const at::Tensor& matrix, const at::Tensor& right, double alpha,
                  const int64_t* dropout_seed = nullptr, uint32_t dropout_threshold = 0) {
  using namespace token_reduce_detail;
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && right.is_contiguous() && right.scalar_type() == at::kFloat);
  const int64_t tokens = matrix.size(0), columns = matrix.size(1), rank = right.size(1);
  if (tokens == 0) {
    out.zero_();
    return;
  }
  const int64_t slabs = (columns + kSlab - 1) / kSlab;
  const int64_t rank_chunks = (rank + kRankChunk - 1) / kRankChunk;
  const int64_t wanted_blocks = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = std::max<int64_t>(1, (wanted_blocks + slabs * rank_chunks - 1) / (slabs * rank_chunks));
  splits = std::min<int64_t>(splits, (tokens + 4 * kTokenTile - 1) / (4 * kTokenTile));  // ≥ 128 tokens a split
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  const int64_t tokens_per_split = (tokens + splits - 1) / splits;
  splits = (tokens + tokens_per_split - 1) / tokens_per_split;
  LORA_CHECK(slabs <= std::numeric_limits<int32_t>::max() && rank_chunks <= 65535,
              "lora_ext: gradient too large for the launch grid");

  at::Tensor partials = splits == 1 ? out : at::empty({splits, columns, rank}, out.options());
  TokenReduceParams p{};
  p.matrix = matrix.data_ptr();
  p.matrix_stride_t = matrix.stride(0);
  p.matrix_stride_c = matrix.stride(1);
  p.right = right.data_ptr<float>();
  p.partials = partials.data_ptr<float>();
  p.tokens = tokens;
  p.columns = columns;
  p.rank = rank;
  p.tokens_per_split = tokens_per_split;
  p.alpha = static_cast<float>(alpha);
  p.pair_loads = p.matrix_stride_c == 1 && (tokens <= 1 || p.matrix_stride_t % 2 == 0) &&
                 reinterpret_cast<uintptr_t>(p.matrix) % (2 * sizeof(TM)) == 0;
  p.dropout_seed = dropout_seed;
  p.dropout_threshold = dropout_threshold;
  const dim3 grid(static_cast<unsigned>(slabs), static_cast<unsigned>(splits), static_cast<unsigned>(rank_chunks));
  lora_token_reduce_kernel<TM, DROPOUT><<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) at::sum_out(out, partials, {0});
}

}  // namespace cuda
}  // namespace lora_ext
