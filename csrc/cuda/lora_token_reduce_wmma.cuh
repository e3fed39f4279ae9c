// token-reduce on tensor cores: out[c, j] = alpha · Σ_t keep(t, c) · M[t, c] · R[t, j]   (16-bit M)
//
// The adapter gradients dB = s·dyᵀ·xa and dAᵀ = dropout(x)ᵀ·dxa as one streaming pass over M with
// 16×16×16 MMAs; R (float32, tokens × r) is rounded to M's type as it is staged, as in PEFT's bf16
// LoRA. Grid: x over 128-column tiles of M, y over token splits. Block: 4 warps, each owning 32
// columns × all RPAD ranks. Per 32 tokens the block stages M (32 × 128, 16-byte loads, dropout applied)
// and R (32 × RPAD, zeros past r) in shared memory and each warp accumulates Mᵀ·R. Each split writes float32
// partials (splits × C_pad × RPAD) that a second, small kernel adds in a fixed order (results repeat bit for bit)
// and writes straight into the caller's output, in its dtype and layout (dB as (out × r), dA as Aᵀ's (in × r)
// view of an (r × in) tensor): no sum, narrow-copy, cast and transpose launches after it.
// Bytes: M read once; R once per column tile; partials 4·splits·C·RPAD, written once and read once.
#pragma once

#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <mma.h>

#include "async_copy.cuh"
#include "dependent_launch.h"
#include "dropout_keep_bytes.cuh"
#include "lora_token_reduce.cuh"
#include "rounded_copy.cuh"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {

namespace token_reduce_wmma_detail {
constexpr int kCols = 128;
constexpr int kTokens = 32;
constexpr int kPitch = kCols + 8;
}  // namespace token_reduce_wmma_detail

template <typename T, int RPAD, bool DROPOUT>
__global__ void __launch_bounds__(128) lora_token_reduce_wmma_kernel(const TokenReduceParams p) {
  using namespace token_reduce_wmma_detail;
  using namespace nvcuda;
  using MmaT = typename WmmaType<T>::type;
  if constexpr (!WmmaType<T>::kCompiled) __trap();  // never launched there (wmma_dtype_usable)
  wait_for_preceding_kernel();  // launched as a programmatic dependent (dependent_launch.h): nothing read before
  constexpr int kRightPitch = RPAD + 8;
  __shared__ __align__(32) T matrix_tile[kTokens][kPitch];
  __shared__ __align__(32) T right_tile[kTokens][kRightPitch];

  const int warp = threadIdx.x / 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCols;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * p.tokens_per_split;
  const int64_t t_end = min(p.tokens, t_begin + p.tokens_per_split);
  const T* matrix = static_cast<const T*>(p.matrix);
  // R is contiguous with a 16-byte aligned base (token_reduce_wmma_supported): its rows are 16-byte aligned
  // exactly when r % 8 == 0; otherwise its ranks are loaded one by one, zeros past r.
  const bool right_vector_rows = p.rank % 8 == 0;

  uint64_t seed = 0;
  if constexpr (DROPOUT) seed = static_cast<uint64_t>(*p.dropout_seed);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][RPAD / 16];
#pragma unroll
  for (int cf = 0; cf < 2; ++cf)
#pragma unroll
    for (int jf = 0; jf < RPAD / 16; ++jf) wmma::fill_fragment(acc[cf][jf], 0.f);

  // M: 32 tokens × 16 vectors of 8 columns per step, four per thread. The next step's loads are issued
  // before this step's MMAs, so HBM reads overlap the math.
  constexpr int kLoads = kTokens * kCols / 8 / 128;
  uint4 m_next[kLoads];
  auto load_m = [&](int64_t t0) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int v = threadIdx.x + 128 * i, r = v / (kCols / 8), c = (v % (kCols / 8)) * 8;
      const int64_t t = t0 + r, col = c0 + c;
      m_next[i] = (t < t_end && col < p.columns)
                      ? *reinterpret_cast<const uint4*>(matrix + t * p.matrix_stride_t + col)
                      : make_uint4(0, 0, 0, 0);
    }
  };
  if (t_begin < t_end) load_m(t_begin);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokens) {
    // This step's M, then the next step's loads issued before the dropout mask is drawn for this one, so the
    // Philox arithmetic overlaps them (drawn first, it left no load in flight: dA took 61 µs with dropout, 32
    // without, docs/perf-notes.md v11).
    uint4 m_now[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) m_now[i] = m_next[i];
    if (t0 + kTokens < t_end) load_m(t0 + kTokens);
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int v = threadIdx.x + 128 * i, r = v / (kCols / 8), c = (v % (kCols / 8)) * 8;
      uint4 bits = m_now[i];
      if constexpr (DROPOUT) {
        if (t0 + r < t_end && c0 + c < p.columns) {
          const unsigned keep = dropout_keep8(seed, t0 + r, (c0 + c) >> 3, p.dropout_threshold);
          bits = apply_keep8<T>(bits, keep);
          // One thread per row and 8 columns: each keep byte is written once.
          if (p.keep_bytes != nullptr) p.keep_bytes[(t0 + r) * p.keep_pitch + ((c0 + c) >> 3)] = static_cast<uint8_t>(keep);
        }
      }
      *reinterpret_cast<uint4*>(&matrix_tile[r][c]) = bits;
    }
    for (int v = threadIdx.x; v < kTokens * (RPAD / 8); v += 128) {
      const int r = v / (RPAD / 8), j = (v % (RPAD / 8)) * 8;
      const int64_t t = t0 + r;
      uint4 bits = make_uint4(0, 0, 0, 0);
      if (t < t_end && j < p.rank) bits = load8_ranks_as<T>(p.right + t * p.rank, j, p.rank, right_vector_rows);
      *reinterpret_cast<uint4*>(&right_tile[r][j]) = bits;
    }
    __syncthreads();
#pragma unroll
    for (int kt = 0; kt < kTokens; kt += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, MmaT, wmma::row_major> b[RPAD / 16];
#pragma unroll
      for (int jf = 0; jf < RPAD / 16; ++jf) {
        wmma::load_matrix_sync(b[jf], reinterpret_cast<const MmaT*>(&right_tile[kt][jf * 16]), kRightPitch);
      }
#pragma unroll
      for (int cf = 0; cf < 2; ++cf) {
        // Mᵀ (columns × tokens) is M's tile read column-major.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, MmaT, wmma::col_major> a;
        wmma::load_matrix_sync(a, reinterpret_cast<const MmaT*>(&matrix_tile[kt][warp * 32 + cf * 16]), kPitch);
#pragma unroll
        for (int jf = 0; jf < RPAD / 16; ++jf) wmma::mma_sync(acc[cf][jf], a, b[jf], acc[cf][jf]);
      }
    }
    __syncthreads();
  }

  // partials: (splits × C_pad × RPAD); C_pad covers whole 128-column tiles, so every store is in bounds.
  const int64_t columns_padded = static_cast<int64_t>(gridDim.x) * kCols;
  float* out = p.partials + static_cast<int64_t>(blockIdx.y) * columns_padded * RPAD;
#pragma unroll
  for (int cf = 0; cf < 2; ++cf) {
#pragma unroll
    for (int jf = 0; jf < RPAD / 16; ++jf) {
#pragma unroll
      for (int e = 0; e < acc[cf][jf].num_elements; ++e) acc[cf][jf].x[e] *= p.alpha;
      wmma::store_matrix_sync(out + (c0 + warp * 32 + cf * 16) * RPAD + jf * 16, acc[cf][jf], RPAD,
                              wmma::mem_row_major);
    }
  }
}

// out[c, j] = Σ_s partials[s][c][j] (s in order), rounded once to out's type; out (C × r, r ≤ 64) with any strides.
// A block takes 16 columns: it sums their partials rank-fastest (the partial rows are contiguous) into shared memory,
// then writes out along out's unit-stride dimension (ranks for dB's (out × r), columns for the transposed (in × r)
// view of dA), so both the reads and the writes coalesce. Each thread loads its splits 8 at a time before adding
// them (in order): one load in flight per thread left the first version waiting on memory (10.5 µs for 4 MB).
constexpr int kFinalizeColumns = 16;
constexpr int kFinalizeSplitsInFlight = 8;
// TRounded: the dtype of `rounded` (rounded_copy.cuh: row c holds the sums · scale), if one is given. `block` is
// the block's index among those finalizing this output (columns 16·block …).
template <typename TOut, typename TRounded = TOut>
__device__ __forceinline__ void finalize_token_reduce_block(const float* __restrict__ partials, int64_t splits,
                                                            int64_t columns, int64_t columns_padded, int rank,
                                                            int rpad, TOut* out, int64_t out_stride_c,
                                                            int64_t out_stride_j, bool columns_fastest,
                                                            RoundedCopy rounded, int64_t block) {
  __shared__ float sums[kFinalizeColumns][64 + 1];
  const int64_t c0 = block * kFinalizeColumns;
  const int width = columns - c0 < kFinalizeColumns ? static_cast<int>(columns - c0) : kFinalizeColumns;
  const int64_t split_stride = columns_padded * rpad;
  for (int i = threadIdx.x; i < width * rank; i += blockDim.x) {
    const int c = i / rank, j = i % rank;
    const float* source = partials + (c0 + c) * rpad + j;
    float sum = 0.f;
    int64_t split = 0;
    for (; split + kFinalizeSplitsInFlight <= splits; split += kFinalizeSplitsInFlight) {
      float values[kFinalizeSplitsInFlight];
#pragma unroll
      for (int q = 0; q < kFinalizeSplitsInFlight; ++q) values[q] = source[(split + q) * split_stride];
#pragma unroll
      for (int q = 0; q < kFinalizeSplitsInFlight; ++q) sum += values[q];
    }
    for (; split < splits; ++split) sum += source[split * split_stride];
    sums[c][j] = sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < width * rank; i += blockDim.x) {
    const int c = columns_fastest ? i % width : i / rank, j = columns_fastest ? i / width : i % rank;
    const TOut value = static_cast<TOut>(sums[c][j]);
    out[(c0 + c) * out_stride_c + j * out_stride_j] = value;
    if (rounded.out != nullptr) {
      static_cast<TRounded*>(rounded.out)[(c0 + c) * rounded.pitch + j] =
          static_cast<TRounded>(static_cast<float>(value) * rounded.scale);
    }
  }
}

template <typename TOut, typename TRounded = TOut>
__global__ void __launch_bounds__(256)
    finalize_token_reduce_kernel(const float* __restrict__ partials, int64_t splits, int64_t columns,
                                 int64_t columns_padded, int rank, int rpad, TOut* out, int64_t out_stride_c,
                                 int64_t out_stride_j, bool columns_fastest, RoundedCopy rounded = {}) {
  wait_for_preceding_kernel();  // launched as a programmatic dependent (dependent_launch.h): nothing read before
  finalize_token_reduce_block<TOut, TRounded>(partials, splits, columns, columns_padded, rank, rpad, out, out_stride_c,
                                              out_stride_j, columns_fastest, rounded, blockIdx.x);
}

inline bool token_reduce_wmma_supported(const at::Tensor& matrix, const at::Tensor& right) {
  const auto dtype = matrix.scalar_type();
  if (!wmma_dtype_usable(dtype)) return false;
  const int64_t rank = right.size(1);
  if (rank > 64 || matrix.size(1) % 8 != 0) return false;
  if (!right.is_contiguous() || !aligned16(right.data_ptr())) return false;
  return matrix.stride(1) == 1 && (matrix.size(0) <= 1 || matrix.stride(0) % 8 == 0) && aligned16(matrix.data_ptr());
}

// out (C × r: float32, float16 or bfloat16, any strides) = alpha · Σ_t keep · M[t, :]ᵀ R[t, :], rounded once.
// With dropout, keep_out (if set) receives the mask's keep bytes as drawn (dropout_keep_bytes.cuh).
template <typename T, bool DROPOUT>
void launch_token_reduce_wmma(at::Tensor& out, const at::Tensor& matrix, const at::Tensor& right, double alpha,
                              const int64_t* dropout_seed, uint32_t dropout_threshold, KeepBytesOut keep_out = {}) {
  using namespace token_reduce_wmma_detail;
  const int64_t tokens = matrix.size(0), columns = matrix.size(1), rank = right.size(1);
  if (columns == 0 || rank == 0) return;  // nothing to write (and no empty grids)
  if (tokens == 0) {
    out.zero_();
    return;
  }
  const int64_t rpad = rank <= 16 ? 16 : rank <= 32 ? 32 : 64;
  const int64_t column_tiles = (columns + kCols - 1) / kCols;
  // Blocks to aim for per SM (5 fit at 96 registers). The dropout variant draws Philox words between its loads and
  // its MMAs; a grid of twice as many, shorter splits (more partials to add: 9 against 4.5 MB at 8192 × 4096) took
  // its dA from 56 to 47 µs on an H100, where the plain variant lost 1 µs (docs/perf-notes.md v14).
  const int64_t blocks_per_sm = DROPOUT ? 8 : 4;
  const int64_t wanted_blocks = blocks_per_sm * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = (wanted_blocks + column_tiles - 1) / column_tiles;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, (tokens + 63) / 64, 65535}));  // ≥ 64 tokens a split
  const int64_t tokens_per_split = (tokens + splits - 1) / splits;
  splits = (tokens + tokens_per_split - 1) / tokens_per_split;
  LORA_CHECK(column_tiles <= std::numeric_limits<int32_t>::max(), "lora_ext: too many features (", columns, ")");

  at::Tensor partials = at::empty({splits, column_tiles * kCols, rpad}, out.options().dtype(at::kFloat));
  TokenReduceParams p{};
  p.matrix = matrix.data_ptr();
  p.matrix_stride_t = matrix.stride(0);
  p.matrix_stride_c = 1;
  p.right = right.data_ptr<float>();
  p.partials = partials.data_ptr<float>();
  p.tokens = tokens;
  p.columns = columns;
  p.rank = rank;
  p.tokens_per_split = tokens_per_split;
  p.alpha = static_cast<float>(alpha);
  p.dropout_seed = dropout_seed;
  p.dropout_threshold = dropout_threshold;
  p.keep_bytes = DROPOUT ? keep_out.bytes : nullptr;
  p.keep_pitch = keep_out.pitch;
  const dim3 grid(static_cast<unsigned>(column_tiles), static_cast<unsigned>(splits));
  auto launch = [&](auto rpad_tag) {
    constexpr int RPAD = decltype(rpad_tag)::value;
    launch_dependent(lora_token_reduce_wmma_kernel<T, RPAD, DROPOUT>, grid, dim3(128), 0, p);
  };
  if (rpad == 16) {
    launch(std::integral_constant<int, 16>{});
  } else if (rpad == 32) {
    launch(std::integral_constant<int, 32>{});
  } else {
    launch(std::integral_constant<int, 64>{});
  }
  const bool columns_fastest = out.stride(0) == 1 && out.stride(1) != 1;
  const int64_t blocks = (columns + kFinalizeColumns - 1) / kFinalizeColumns;
  LORA_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "lora_ext: too many features (", columns, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "finalize_token_reduce", [&] {
    launch_dependent(finalize_token_reduce_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)), dim3(256), 0,
                     partials.data_ptr<float>(), splits, columns, column_tiles * kCols, static_cast<int>(rank),
                     static_cast<int>(rpad), out.data_ptr<scalar_t>(), out.stride(0), out.stride(1), columns_fastest,
                     RoundedCopy{});
  });
}

}  // namespace cuda
}  // namespace lora_ext
