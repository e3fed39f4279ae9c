// shrink on tensor cores: out[t, j] = alpha · Σ_k keep(t, k) · X[t, k] · W[j, k]   (16-bit X; W 16-bit or
// float32, rounded to X's type as it is staged)
//
// The pass over a (tokens × K) activation that yields its rank-r projection, in float32:
//   forward   xa  = dropout(x)·Aᵀ   (X = x, W = A, dropout on X)
//   backward  dxa = s·dy·B          (X = dy, W = Bᵀ)
// Grid: one block per 16 tokens. Block: 4 warps that split K four ways; each warp stages a 16 × 64 tile
// of X (16-byte loads, dropout applied on the way) and the matching r × 64 slice of W in shared memory,
// runs 16×16×16 bf16/fp16 MMAs (WMMA) into float32 accumulators, and the four partial sums are added
// in a fixed order at the end. Bytes: X once (the floor); W once per block, from L2. Needs 16-byte
// aligned rows with unit column stride, K % 8 == 0 and r ≤ 64; launch_shrink() falls back to the general
// kernel otherwise, and for the last tokens % 16 rows.
#pragma once

#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <mma.h>

#include "async_copy.cuh"
#include "dependent_launch.h"
#include "rounded_copy.cuh"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {

struct ShrinkParams {
  const void* x;  // X (tokens × K), unit column stride
  int64_t x_stride_t;
  const void* w;  // W (r × K): element (j, k) at w[j·w_stride_j + k·w_stride_k]
  int64_t w_stride_j, w_stride_k;
  float* out;  // (tokens × r), contiguous
  int64_t k, rank;
  float alpha;
  const int64_t* dropout_seed;
  uint32_t dropout_threshold;
  RoundedCopy rounded;  // in X's dtype
};

namespace shrink_detail {
constexpr int kWarps = 4;
constexpr int kTileK = 64;
constexpr int kPitch = kTileK + 8;  // shared-memory row pitch in elements: 144 bytes, keeps fragments 32-byte aligned

}  // namespace shrink_detail

template <typename T, typename TW, int RPAD, bool DROPOUT, bool W_K_CONTIGUOUS>
__global__ void __launch_bounds__(128) lora_shrink_wmma_kernel(const ShrinkParams p) {
  using namespace shrink_detail;
  using namespace nvcuda;
  using MmaT = typename WmmaType<T>::type;
  if constexpr (!WmmaType<T>::kCompiled) __trap();  // never launched there (wmma_dtype_usable)
  static_assert(RPAD % 16 == 0 && RPAD <= 64, "RPAD must be 16, 32, 48 or 64");
  wait_for_preceding_kernel();  // launched as a programmatic dependent (dependent_launch.h): nothing read before
  __shared__ __align__(32) T x_tile[kWarps][16][kPitch];
  __shared__ __align__(32) T w_tile[kWarps][RPAD][kPitch];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t chunks = (p.k + kTileK - 1) / kTileK;
  const int64_t chunk_begin = chunks * warp / kWarps, chunk_end = chunks * (warp + 1) / kWarps;

  uint64_t seed = 0;
  if constexpr (DROPOUT) seed = static_cast<uint64_t>(*p.dropout_seed);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RPAD / 16];
#pragma unroll
  for (int f = 0; f < RPAD / 16; ++f) wmma::fill_fragment(acc[f], 0.f);

  const T* x = static_cast<const T*>(p.x);
  const TW* w = static_cast<const TW*>(p.w);
  // X: 16 rows × 8 vectors of 8 elements per chunk, four per lane; out-of-range columns (K tail) read as
  // zero. The next chunk's loads are issued before this chunk's MMAs, so HBM reads overlap the math.
  uint4 x_next[4];
  auto load_x = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
      const int64_t col = k0 + c;
      x_next[i] = col < p.k ? *reinterpret_cast<const uint4*>(x + (row0 + r) * p.x_stride_t + col)
                            : make_uint4(0, 0, 0, 0);
    }
  };
  // W (same type as X, K-contiguous: the forward's A and the backward's Bᵀ copy): prefetched like X, since its
  // reads come from L2 on every chunk and, waited for in the loop, left the kernel at half of HBM bandwidth.
  constexpr bool kPrefetchW = W_K_CONTIGUOUS && std::is_same_v<TW, T>;
  constexpr int kWLoads = RPAD * 8 / 32;  // 16-byte vectors of a RPAD × 64 tile, per lane
  uint4 w_next[kPrefetchW ? kWLoads : 1];
  auto load_w = [&](int64_t k0) {
    if constexpr (kPrefetchW) {
#pragma unroll
      for (int i = 0; i < kWLoads; ++i) {
        const int v = lane + 32 * i, j = v / 8, c = (v % 8) * 8;
        const int64_t col = k0 + c;
        w_next[i] = (j < p.rank && col < p.k) ? *reinterpret_cast<const uint4*>(w + j * p.w_stride_j + col)
                                              : make_uint4(0, 0, 0, 0);
      }
    }
  };
  if (chunk_begin < chunk_end) {
    load_x(chunk_begin * kTileK);
    load_w(chunk_begin * kTileK);
  }
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t k0 = chunk * kTileK;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
      uint4 bits = x_next[i];
      if constexpr (DROPOUT) {
        if (k0 + c < p.k) bits = apply_dropout8<T>(bits, seed, row0 + r, k0 + c, p.dropout_threshold);
      }
      *reinterpret_cast<uint4*>(&x_tile[warp][r][c]) = bits;
    }
    if (chunk + 1 < chunk_end) load_x(k0 + kTileK);
    // W: RPAD rows (ranks ≥ r are zero) × 64 columns of K.
    if constexpr (kPrefetchW) {
#pragma unroll
      for (int i = 0; i < kWLoads; ++i) {
        const int v = lane + 32 * i, j = v / 8, c = (v % 8) * 8;
        *reinterpret_cast<uint4*>(&w_tile[warp][j][c]) = w_next[i];
      }
      if (chunk + 1 < chunk_end) load_w(k0 + kTileK);
    } else if constexpr (W_K_CONTIGUOUS) {
#pragma unroll
      for (int i = 0; i < RPAD * 8 / 32; ++i) {
        const int v = lane + 32 * i, j = v / 8, c = (v % 8) * 8;
        const int64_t col = k0 + c;
        uint4 bits = make_uint4(0, 0, 0, 0);
        if (j < p.rank && col < p.k) bits = load8_as<T>(w + j * p.w_stride_j + col);
        *reinterpret_cast<uint4*>(&w_tile[warp][j][c]) = bits;
      }
    } else {
      // W's ranks are contiguous (W = Bᵀ): load 8 ranks of one k at a time, store them down a column.
#pragma unroll
      for (int i = 0; i < kTileK * (RPAD / 8) / 32; ++i) {
        const int v = lane + 32 * i, c = v / (RPAD / 8), j = (v % (RPAD / 8)) * 8;
        const int64_t col = k0 + c;
        uint4 bits = make_uint4(0, 0, 0, 0);
        if (j < p.rank && col < p.k) bits = load8_as<T>(w + col * p.w_stride_k + j);
        Pack8<T> pack;
        pack.bits = bits;
#pragma unroll
        for (int q = 0; q < 8; ++q) w_tile[warp][j + q][c] = pack.v[q];
      }
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, MmaT, wmma::row_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const MmaT*>(&x_tile[warp][0][kk]), kPitch);
#pragma unroll
      for (int f = 0; f < RPAD / 16; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MmaT, wmma::col_major> b;
        wmma::load_matrix_sync(b, reinterpret_cast<const MmaT*>(&w_tile[warp][f * 16][kk]), kPitch);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncwarp();
  }

  // Add the four warps' partial sums in a fixed order, through the (now free) W tiles.
  __syncthreads();
  float* partial = reinterpret_cast<float*>(&w_tile[0][0][0]);  // [kWarps][16][RPAD]
  static_assert(sizeof(float) * kWarps * 16 * RPAD <= sizeof(T) * kWarps * RPAD * kPitch, "reuse fits");
#pragma unroll
  for (int f = 0; f < RPAD / 16; ++f) {
    wmma::store_matrix_sync(partial + warp * 16 * RPAD + f * 16, acc[f], RPAD, wmma::mem_row_major);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < 16 * RPAD; idx += 128) {
    const int r = idx / RPAD, j = idx % RPAD;
    if (j >= p.rank) continue;
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < kWarps; ++q) sum += partial[q * 16 * RPAD + r * RPAD + j];
    const float value = p.alpha * sum;
    p.out[(row0 + r) * p.rank + j] = value;
    if (p.rounded.out != nullptr) {
      static_cast<T*>(p.rounded.out)[(row0 + r) * p.rounded.pitch + j] = static_cast<T>(value * p.rounded.scale);
    }
  }
}

// Whether the tensor-core shrink can take these operands (else the general kernel runs).
inline bool shrink_wmma_supported(const at::Tensor& x, const at::Tensor& w_rk_view, int64_t rank) {
  const auto dtype = x.scalar_type();
  if (!wmma_dtype_usable(dtype)) return false;
  if (w_rk_view.scalar_type() != dtype && w_rk_view.scalar_type() != at::kFloat) return false;
  if (rank > 64 || x.size(1) % 8 != 0 || x.size(0) < 16) return false;
  if (x.stride(1) != 1 || x.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
  if (!aligned16(w_rk_view.data_ptr())) return false;
  const int64_t stride_j = w_rk_view.stride(0), stride_k = w_rk_view.stride(1);
  if (stride_k == 1) return rank == 1 || stride_j % 8 == 0;
  if (stride_j == 1) return rank % 8 == 0 && stride_k % 8 == 0;
  return false;
}

// out[:full_rows] (and rounded's rows) for the first tokens − tokens % 16 rows; the caller handles the rest.
template <typename T, typename TW, bool DROPOUT>
void launch_shrink_wmma(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_rk_view, double alpha,
                        const int64_t* dropout_seed, uint32_t dropout_threshold, RoundedCopy rounded = {}) {
  ShrinkParams p{};
  p.x = x.data_ptr();
  p.x_stride_t = x.stride(0);
  p.w = w_rk_view.data_ptr();
  p.w_stride_j = w_rk_view.stride(0);
  p.w_stride_k = w_rk_view.stride(1);
  p.out = out.data_ptr<float>();
  p.k = x.size(1);
  p.rank = w_rk_view.size(0);
  p.alpha = static_cast<float>(alpha);
  p.dropout_seed = dropout_seed;
  p.dropout_threshold = dropout_threshold;
  p.rounded = rounded;
  const int64_t blocks = x.size(0) / 16;
  LORA_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "lora_ext: too many tokens (", x.size(0), ")");
  const bool k_contiguous = p.w_stride_k == 1;
  auto launch = [&](auto rpad_tag) {
    constexpr int RPAD = decltype(rpad_tag)::value;
    if (k_contiguous) {
      launch_dependent(lora_shrink_wmma_kernel<T, TW, RPAD, DROPOUT, true>, dim3(static_cast<unsigned>(blocks)),
                       dim3(128), 0, p);
    } else {
      launch_dependent(lora_shrink_wmma_kernel<T, TW, RPAD, DROPOUT, false>, dim3(static_cast<unsigned>(blocks)),
                       dim3(128), 0, p);
    }
  };
  if (p.rank <= 16) {
    launch(std::integral_constant<int, 16>{});
  } else if (p.rank <= 32) {
    launch(std::integral_constant<int, 32>{});
  } else {
    launch(std::integral_constant<int, 64>{});
  }
}

}  // namespace cuda
}  // namespace lora_ext
