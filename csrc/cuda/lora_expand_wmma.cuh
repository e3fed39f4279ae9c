// expand-add on tensor cores: C[m, n] += alpha · Σ_j L[m, j] · R[n, j]  (· keep(m, n)), 16-bit C.
//
// The same fold as lora_expand.cuh (y += s·xa·Bᵀ, dx += keep·dxa·A, W ±= s·B·A), with the rank-r
// product on 16×16×16 MMAs so the kernel is bound by its one read and one write of C alone.
// L and R (float32 or 16-bit) are rounded to C's type as they are staged, as PEFT's bf16 adapters do.
// Grid: x over 64-row tiles of C, y over 64-column tiles. Block: 4 warps, each 16 rows × 64 columns.
// Each thread first issues its four 16-byte loads of C, then the block stages L (64 × r) and R
// (64 × r) in shared memory, each warp runs its MMAs into float32, parks them in shared memory, and
// adds them to the C values it loaded. Bytes: C read and written once; L and R once per tile (L2).
#pragma once

#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <mma.h>

#include "lora_expand.cuh"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {

// Ranks up to this go in one pass (r ≤ 64 keeps its staging and product buffers apart; r = 128 reuses
// the staging buffers for the product, to stay within 48 KB of static shared memory).
constexpr int64_t kExpandWmmaMaxRank = 128;

namespace expand_wmma_detail {
constexpr int kTile = 64;
constexpr int kOutPitch = kTile + 8;  // float32 staging pitch: 288 bytes, fragments stay 32-byte aligned
}  // namespace expand_wmma_detail

template <typename T, typename TL, typename TR, int RPAD, bool DROPOUT, bool R_RANK_CONTIGUOUS>
__global__ void __launch_bounds__(128) lora_expand_wmma_kernel(const ExpandParams p) {
  using namespace expand_wmma_detail;
  using namespace nvcuda;
  using MmaT = typename WmmaType<T>::type;
  if constexpr (!WmmaType<T>::kCompiled) __trap();  // never launched there (wmma_dtype_usable)
  static_assert(RPAD % 16 == 0 && RPAD <= kExpandWmmaMaxRank, "RPAD must be 16, 32, 64 or 128");
  constexpr int kPitch = RPAD + 8;
  constexpr size_t kStageBytes = 2 * kTile * kPitch * sizeof(T);
  constexpr size_t kProductBytes = 4 * 16 * kOutPitch * sizeof(float);
  constexpr bool kReuseStaging = RPAD > 64;  // the product overwrites the staged tiles once all warps used them
  constexpr size_t kSharedBytes =
      kReuseStaging ? (kStageBytes > kProductBytes ? kStageBytes : kProductBytes) : kStageBytes + kProductBytes;
  __shared__ __align__(32) unsigned char shared[kSharedBytes];
  auto left_tile = reinterpret_cast<T(*)[kPitch]>(shared);
  auto right_tile = reinterpret_cast<T(*)[kPitch]>(shared + kTile * kPitch * sizeof(T));  // [n][j]: (j × n) column-major
  auto out_tile = reinterpret_cast<float(*)[16][kOutPitch]>(shared + (kReuseStaging ? 0 : kStageBytes));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile, n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  T* out = static_cast<T*>(p.out);

  // 1. This warp's 16 × 64 slice of C: four 8-element vectors per lane, loaded before anything else.
  uint4 old[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
    const int64_t row = m0 + warp * 16 + r, col = n0 + c;
    if (row < p.m && col < p.n) old[i] = *reinterpret_cast<const uint4*>(out + row * p.out_stride_m + col);
  }

  // 2. Stage L (rows m0…m0+63) and R (columns n0…n0+63), all RPAD ranks (ranks ≥ r are zero).
  const TL* left = static_cast<const TL*>(p.left);
  const TR* right = static_cast<const TR*>(p.right);
  for (int v = threadIdx.x; v < kTile * (RPAD / 8); v += 128) {
    const int r = v / (RPAD / 8), j = (v % (RPAD / 8)) * 8;
    const int64_t row = m0 + r;
    uint4 bits = make_uint4(0, 0, 0, 0);
    if (row < p.m && j < p.rank) bits = load8_ranks_as<T>(left + row * p.left_stride_m, j, p.rank, p.left_vector_rows);
    *reinterpret_cast<uint4*>(&left_tile[r][j]) = bits;
  }
  if constexpr (R_RANK_CONTIGUOUS) {
    for (int v = threadIdx.x; v < kTile * (RPAD / 8); v += 128) {
      const int n = v / (RPAD / 8), j = (v % (RPAD / 8)) * 8;
      const int64_t col = n0 + n;
      uint4 bits = make_uint4(0, 0, 0, 0);
      if (col < p.n && j < p.rank) {
        bits = load8_ranks_as<T>(right + col * p.right_stride_n, j, p.rank, p.right_vector_rows);
      }
      *reinterpret_cast<uint4*>(&right_tile[n][j]) = bits;
    }
  } else {
    // R's columns are contiguous (R = Aᵀ): load 8 columns of one rank, store them down the tile.
    for (int v = threadIdx.x; v < RPAD * (kTile / 8); v += 128) {
      const int j = v / (kTile / 8), n = (v % (kTile / 8)) * 8;
      const int64_t col = n0 + n;
      uint4 bits = make_uint4(0, 0, 0, 0);
      if (col < p.n && j < p.rank) bits = load8_as<T>(right + j * p.right_stride_j + col);
      Pack8<T> pack;
      pack.bits = bits;
#pragma unroll
      for (int q = 0; q < 8; ++q) right_tile[n + q][j] = pack.v[q];
    }
  }
  __syncthreads();

  // 3. This warp's 16 × 64 product, four 16 × 16 accumulators, parked in shared memory as float32.
  wmma::fragment<wmma::matrix_a, 16, 16, 16, MmaT, wmma::row_major> a[RPAD / 16];
#pragma unroll
  for (int kk = 0; kk < RPAD / 16; ++kk) {
    wmma::load_matrix_sync(a[kk], reinterpret_cast<const MmaT*>(&left_tile[warp * 16][kk * 16]), kPitch);
  }
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTile / 16];
#pragma unroll
  for (int f = 0; f < kTile / 16; ++f) {
    wmma::fill_fragment(acc[f], 0.f);
#pragma unroll
    for (int kk = 0; kk < RPAD / 16; ++kk) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, MmaT, wmma::col_major> b;
      wmma::load_matrix_sync(b, reinterpret_cast<const MmaT*>(&right_tile[f * 16][kk * 16]), kPitch);
      wmma::mma_sync(acc[f], a[kk], b, acc[f]);
    }
    if constexpr (!kReuseStaging) {
      wmma::store_matrix_sync(&out_tile[warp][0][f * 16], acc[f], kOutPitch, wmma::mem_row_major);
    }
  }
  if constexpr (kReuseStaging) {
    __syncthreads();  // every warp is done with the staged tiles
#pragma unroll
    for (int f = 0; f < kTile / 16; ++f) {
      wmma::store_matrix_sync(&out_tile[warp][0][f * 16], acc[f], kOutPitch, wmma::mem_row_major);
    }
  }
  __syncwarp();

  // 4. C += alpha · product (· keep), rounded once, 16 bytes at a time.
  uint64_t seed = 0;
  if constexpr (DROPOUT) seed = static_cast<uint64_t>(*p.dropout_seed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
    const int64_t row = m0 + warp * 16 + r, col = n0 + c;
    if (row >= p.m || col >= p.n) continue;
    unsigned keep = 0xffu;
    if constexpr (DROPOUT) {
      keep = dropout_keep8(seed, row, col >> 3, p.dropout_threshold);
    }
    const float4 lo = *reinterpret_cast<const float4*>(&out_tile[warp][r][c]);
    const float4 hi = *reinterpret_cast<const float4*>(&out_tile[warp][r][c + 4]);
    const float delta[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    Pack8<T> pack;
    pack.bits = old[i];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float d = ((keep >> q) & 1u) ? p.alpha * delta[q] : 0.f;
      pack.v[q] = T(static_cast<float>(pack.v[q]) + d);
    }
    *reinterpret_cast<uint4*>(out + row * p.out_stride_m + col) = pack.bits;
  }
}

// Whether the expand can read a (rows × r) operand along its ranks: 16-byte loads at r % 8 == 0, element loads
// with zeros past r otherwise (instead of a zero-padded copy, which cost two launches per operand).
inline bool rank_rows_loadable(const at::Tensor& t) {
  const int64_t rank = t.size(1);
  if (rank % 8 == 0) return rank_rows_vectorizable(t);
  return t.stride(1) == 1 || rank == 1;
}

// Whether R (N × r) can be read along its columns instead: R = Aᵀ as a view of A (r × N).
inline bool columns_loadable(const at::Tensor& t) {
  return t.stride(0) == 1 && t.stride(1) % 8 == 0 && aligned16(t.data_ptr());
}

// Whether the tensor-core expand can take this output, rank and these operand dtypes, whatever the operands'
// layouts (a caller may copy operands it cannot read; that pays only when this holds).
inline bool expand_wmma_output_supported(const at::Tensor& c, const at::Tensor& left, const at::Tensor& right) {
  const auto dtype = c.scalar_type();
  if (!wmma_dtype_usable(dtype)) return false;
  for (const at::Tensor* t : {&left, &right}) {
    if (t->scalar_type() != dtype && t->scalar_type() != at::kFloat) return false;
  }
  const int64_t rank = left.size(1), m = c.size(0), n = c.size(1);
  if (rank > kExpandWmmaMaxRank || n % 8 != 0) return false;
  return c.stride(1) == 1 && (m <= 1 || c.stride(0) % 8 == 0) && aligned16(c.data_ptr());
}

// Whether the tensor-core expand can take these operands (else lora_expand.cuh's kernel runs).
inline bool expand_wmma_supported(const at::Tensor& c, const at::Tensor& left, const at::Tensor& right) {
  return expand_wmma_output_supported(c, left, right) && rank_rows_loadable(left) &&
         (rank_rows_loadable(right) || columns_loadable(right));
}

template <typename T, typename TL, typename TR, bool DROPOUT>
void launch_expand_wmma(const at::Tensor& c, const at::Tensor& left, const at::Tensor& right, double alpha,
                        const int64_t* dropout_seed, uint32_t dropout_threshold) {
  using namespace expand_wmma_detail;
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
  p.dropout_seed = dropout_seed;
  p.dropout_threshold = dropout_threshold;
  p.left_vector_rows = rank_rows_vectorizable(left);
  p.right_vector_rows = rank_rows_vectorizable(right);
  if (p.m == 0 || p.n == 0) return;
  const int64_t tiles_m = (p.m + kTile - 1) / kTile, tiles_n = (p.n + kTile - 1) / kTile;
  LORA_CHECK(tiles_n <= 65535, "lora_ext: output too wide for the launch grid (", p.n, " columns)");
  LORA_CHECK(tiles_m <= std::numeric_limits<int32_t>::max(), "lora_ext: too many rows (", p.m, ")");
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n));
  const bool rank_contiguous = rank_rows_loadable(right);
  auto launch = [&](auto rpad_tag) {
    constexpr int RPAD = decltype(rpad_tag)::value;
    if (rank_contiguous) {
      lora_expand_wmma_kernel<T, TL, TR, RPAD, DROPOUT, true><<<grid, 128, 0, at::cuda::getCurrentCUDAStream()>>>(p);
    } else {
      lora_expand_wmma_kernel<T, TL, TR, RPAD, DROPOUT, false><<<grid, 128, 0, at::cuda::getCurrentCUDAStream()>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (p.rank <= 16) {
    launch(std::integral_constant<int, 16>{});
  } else if (p.rank <= 32) {
    launch(std::integral_constant<int, 32>{});
  } else if (p.rank <= 64) {
    launch(std::integral_constant<int, 64>{});
  } else {
    launch(std::integral_constant<int, 128>{});
  }
}

}  // namespace cuda
}  // namespace lora_ext
