// The whole low-rank forward for a few tokens (decoding), in one launch:
//   xa[t, :] = keep_scale · dropout(x[t, :])·Aᵀ   (written out: backward needs it)
//   y[t, :] += s · xa[t, :]·Bᵀ
// At decoding sizes the cost is launches and latency, not bytes (PERF-FACTS: each extra kernel costs
// 6–10 µs against a 24 µs base GEMM), so shrink and expand share one kernel. Grid: a cluster of 8 blocks
// per token (sm_90 thread-block clusters; one block per token before sm_90). Block b reduces its eighth of K for all r ranks in float32 (warp
// shuffles, then the warp sums in a fixed order); the cluster adds the eight partials through distributed
// shared memory, in block order, so every block holds the same xa; block b then updates its eighth of y's
// columns, 8 consecutive outputs per thread. Bytes: x and y rows once; A and B once per token (from L2
// after the first token), each SM reading an eighth of them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include <array>
#include <atomic>

#include "cluster_launch.h"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {

constexpr int64_t kDecodeMaxTokens = 32;

struct DecodeParams {
  const void* x;
  int64_t x_stride_t;
  const void* lora_A;  // (r × K), unit stride along K
  int64_t a_stride_j;
  const void* lora_B;  // (N × r), unit stride along r
  int64_t b_stride_n;
  void* y;  // (tokens × N), unit stride along N
  int64_t y_stride_t;
  float* lora_activation;  // (tokens × r), contiguous
  int64_t k, n, rank;
  float scaling, keep_scale;
  const int64_t* dropout_seed;
  uint32_t dropout_threshold;
};

// A cluster of kDecodeClusterBlocks blocks per token (Hopper thread-block clusters): block b reduces its
// 1/8 of K into a partial x·Aᵀ in its shared memory; after a cluster barrier every block adds the eight
// partials from distributed shared memory in the same fixed order (so all hold bit-identical xa), and
// updates its 1/8 of y's columns. One block per token left a single SM streaming all of A and B (≈9 µs);
// here each SM reads 1/8 of them.
constexpr int kDecodeClusterBlocks = 8;
constexpr int kDecodeThreads = 128;

// Launched with a cluster dimension of kDecodeClusterBlocks (launch_decode), on sm_90 and later only.
template <typename T, typename TW, int RPAD, bool DROPOUT>
__global__ void __launch_bounds__(kDecodeThreads) lora_decode_cluster_kernel(const DecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kWarps = kDecodeThreads / 32;
  __shared__ float warp_sums[kWarps][RPAD];
  __shared__ float block_partial[RPAD];
  __shared__ float activation[RPAD];
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int part = static_cast<int>(cluster.block_rank());  // blockIdx.x: the K range and column range
  const int64_t t = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(p.x) + t * p.x_stride_t;
  const TW* lora_A = static_cast<const TW*>(p.lora_A);
  const TW* lora_B = static_cast<const TW*>(p.lora_B);

  uint64_t seed = 0;
  if constexpr (DROPOUT) seed = static_cast<uint64_t>(*p.dropout_seed);

  // 1. This block's share of K, in 8-element vectors.
  const int64_t vectors = p.k / 8;
  const int64_t v_begin = vectors * part / kDecodeClusterBlocks, v_end = vectors * (part + 1) / kDecodeClusterBlocks;
  float partial[RPAD];
#pragma unroll
  for (int j = 0; j < RPAD; ++j) partial[j] = 0.f;
  for (int64_t v = v_begin + threadIdx.x; v < v_end; v += kDecodeThreads) {
    const int64_t k = v * 8;
    float xv[8];
    load8_float(x + k, xv);
    if constexpr (DROPOUT) {
      const unsigned keep = dropout_keep8(seed, t, k >> 3, p.dropout_threshold);
#pragma unroll
      for (int q = 0; q < 8; ++q) xv[q] = ((keep >> q) & 1u) ? xv[q] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < RPAD; ++j) {
      if (j < p.rank) {
        float av[8];
        load8_float(lora_A + j * p.a_stride_j + k, av);
#pragma unroll
        for (int q = 0; q < 8; ++q) partial[j] = fmaf(xv[q], av[q], partial[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < RPAD; ++j) {
    float v = partial[j];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][j] = v;
  }
  __syncthreads();
  if (threadIdx.x < RPAD) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x];
    block_partial[threadIdx.x] = sum;
  }

  // 2. The cluster's partials, summed in block order from distributed shared memory.
  cluster.sync();
  if (threadIdx.x < p.rank) {
    float sum = 0.f;
#pragma unroll
    for (int b = 0; b < kDecodeClusterBlocks; ++b) sum += cluster.map_shared_rank(block_partial, b)[threadIdx.x];
    sum *= p.keep_scale;
    activation[threadIdx.x] = sum;
    if (part == 0) p.lora_activation[t * p.rank + threadIdx.x] = sum;
  }
  cluster.sync();  // no block leaves (freeing its shared memory) while another still reads it

  // 3. This block's share of y's columns: y += s · xa·Bᵀ, rounded once.
  T* y = static_cast<T*>(p.y) + t * p.y_stride_t;
  const int64_t out_vectors = p.n / 8;
  const int64_t o_begin = out_vectors * part / kDecodeClusterBlocks,
                o_end = out_vectors * (part + 1) / kDecodeClusterBlocks;
  for (int64_t ov = o_begin + threadIdx.x; ov < o_end; ov += kDecodeThreads) {
    const int64_t o = ov * 8;
    Pack8<T> out;
    out.bits = *reinterpret_cast<const uint4*>(y + o);
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      acc[e] = 0.f;
#pragma unroll
      for (int j0 = 0; j0 < RPAD; j0 += 8) {
        if (j0 < p.rank) {
          float bv[8];
          load8_float(lora_B + (o + e) * p.b_stride_n + j0, bv);
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[e] = fmaf(activation[j0 + q], bv[q], acc[e]);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = T(__fadd_rn(static_cast<float>(out.v[e]), __fmul_rn(p.scaling, acc[e])));
    *reinterpret_cast<uint4*>(y + o) = out.bits;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled for an architecture without clusters: launch_decode never launches it there
#endif
}

// Before sm_90 (no clusters): one block of 256 threads per token does all of it.
template <typename T, typename TW, int RPAD, bool DROPOUT>
__global__ void __launch_bounds__(256) lora_decode_block_kernel(const DecodeParams p) {
  __shared__ float warp_sums[8][RPAD];
  __shared__ float activation[RPAD];
  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(p.x) + t * p.x_stride_t;
  const TW* lora_A = static_cast<const TW*>(p.lora_A);
  const TW* lora_B = static_cast<const TW*>(p.lora_B);

  uint64_t seed = 0;
  if constexpr (DROPOUT) seed = static_cast<uint64_t>(*p.dropout_seed);

  float partial[RPAD];
#pragma unroll
  for (int j = 0; j < RPAD; ++j) partial[j] = 0.f;
  for (int64_t k = threadIdx.x * 8; k < p.k; k += 256 * 8) {
    float xv[8];
    load8_float(x + k, xv);
    if constexpr (DROPOUT) {
      const unsigned keep = dropout_keep8(seed, t, k >> 3, p.dropout_threshold);
#pragma unroll
      for (int q = 0; q < 8; ++q) xv[q] = ((keep >> q) & 1u) ? xv[q] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < RPAD; ++j) {
      if (j < p.rank) {
        float av[8];
        load8_float(lora_A + j * p.a_stride_j + k, av);
#pragma unroll
        for (int q = 0; q < 8; ++q) partial[j] = fmaf(xv[q], av[q], partial[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < RPAD; ++j) {
    float v = partial[j];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][j] = v;
  }
  __syncthreads();
  if (threadIdx.x < p.rank) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) sum += warp_sums[w][threadIdx.x];
    sum *= p.keep_scale;
    activation[threadIdx.x] = sum;
    p.lora_activation[t * p.rank + threadIdx.x] = sum;
  }
  __syncthreads();

  T* y = static_cast<T*>(p.y) + t * p.y_stride_t;
  for (int64_t o = threadIdx.x * 8; o < p.n; o += 256 * 8) {
    Pack8<T> out;
    out.bits = *reinterpret_cast<const uint4*>(y + o);
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      acc[e] = 0.f;
#pragma unroll
      for (int j0 = 0; j0 < RPAD; j0 += 8) {
        if (j0 < p.rank) {
          float bv[8];
          load8_float(lora_B + (o + e) * p.b_stride_n + j0, bv);
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[e] = fmaf(activation[j0 + q], bv[q], acc[e]);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = T(__fadd_rn(static_cast<float>(out.v[e]), __fmul_rn(p.scaling, acc[e])));
    *reinterpret_cast<uint4*>(y + o) = out.bits;
  }
}

inline bool decode_supported(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                             const at::Tensor& y) {
  const int64_t tokens = x.size(0), rank = lora_A.size(0);
  if (tokens == 0 || tokens > kDecodeMaxTokens || rank > 32 || rank % 8 != 0) return false;
  if (x.scalar_type() == at::kFloat) return false;  // 16-bit outputs: one 16-byte vector is 8 elements
  if (x.size(1) % 8 != 0 || y.size(1) % 8 != 0) return false;
  if (x.stride(1) != 1 || (tokens > 1 && x.stride(0) % 8 != 0) || !aligned16(x.data_ptr())) return false;
  if (y.stride(1) != 1 || (tokens > 1 && y.stride(0) % 8 != 0) || !aligned16(y.data_ptr())) return false;
  if (lora_A.stride(1) != 1 || (rank > 1 && lora_A.stride(0) % 8 != 0) || !aligned16(lora_A.data_ptr())) return false;
  return lora_B.stride(1) == 1 && lora_B.stride(0) % 8 == 0 && aligned16(lora_B.data_ptr());
}

// The cluster launch of one instantiation of lora_decode_cluster_kernel, or false where it cannot run: a device
// before sm_90; a build whose code for this kernel is PTX of an older architecture, JIT-compiled here (its body
// is then the empty pre-sm_90 one: a silent no-op, found in review); a GPU that accepts no 8-block cluster
// (e.g. a partitioned one). Decided once per device, by the first instantiation launched there: `decided` is
// static per Kernel type, and every instantiation has the same type (void(*)(DecodeParams)). They differ only in
// registers and shared memory, far below what limits an 8-block cluster, so the first one's answer holds for all.
template <typename Kernel>
bool cluster_decode_usable(Kernel kernel, const cudaLaunchConfig_t& config) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> decided{};  // 0: not yet, 1: usable, 2: not
  const int device = at::cuda::current_device();
  if (at::cuda::getCurrentDeviceProperties()->major < 9) return false;
  std::atomic<int>* slot = device < kMaxDevices ? &decided[device] : nullptr;
  if (slot != nullptr && slot->load() != 0) return slot->load() == 1;
  bool usable = false;
  const cudaError_t pending = cudaPeekAtLastError();  // not ours to clear
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess && attributes.ptxVersion >= 90) {
    int clusters = 0;
    usable = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
  }
  if (pending == cudaSuccess) (void)cudaGetLastError();  // a failed query is an answer (use the block kernel)
  if (slot != nullptr) slot->store(usable ? 1 : 2);
  return usable;
}

template <typename T, typename TW>
void launch_decode(at::Tensor& y, at::Tensor& lora_activation, const at::Tensor& x, const at::Tensor& lora_A,
                   const at::Tensor& lora_B, double scaling, double keep_scale, const int64_t* dropout_seed,
                   uint32_t dropout_threshold) {
  DecodeParams p{};
  p.x = x.data_ptr();
  p.x_stride_t = x.stride(0);
  p.lora_A = lora_A.data_ptr();
  p.a_stride_j = lora_A.stride(0);
  p.lora_B = lora_B.data_ptr();
  p.b_stride_n = lora_B.stride(0);
  p.y = y.data_ptr();
  p.y_stride_t = y.stride(0);
  p.lora_activation = lora_activation.data_ptr<float>();
  p.k = x.size(1);
  p.n = y.size(1);
  p.rank = lora_A.size(0);
  p.scaling = static_cast<float>(scaling);
  p.keep_scale = static_cast<float>(keep_scale);
  p.dropout_seed = dropout_seed;
  p.dropout_threshold = dropout_threshold;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto rpad_tag, auto dropout_tag) {
    constexpr int RPAD = decltype(rpad_tag)::value;
    constexpr bool DROPOUT = decltype(dropout_tag)::value;
    const auto cluster_kernel = lora_decode_cluster_kernel<T, TW, RPAD, DROPOUT>;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(kDecodeClusterBlocks, static_cast<unsigned>(x.size(0)));  // a cluster per token
    config.blockDim = dim3(kDecodeThreads);
    config.stream = stream;
    cudaLaunchAttribute cluster = cluster_along_x(kDecodeClusterBlocks);
    config.attrs = &cluster;
    config.numAttrs = 1;
    if (cluster_decode_usable(cluster_kernel, config)) {
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, cluster_kernel, p));
    } else {
      lora_decode_block_kernel<T, TW, RPAD, DROPOUT><<<static_cast<unsigned>(x.size(0)), 256, 0, stream>>>(p);
    }
  };
  using Dropout = std::true_type;
  using NoDropout = std::false_type;
  if (p.rank <= 16) {
    if (dropout_seed) launch(std::integral_constant<int, 16>{}, Dropout{});
    else launch(std::integral_constant<int, 16>{}, NoDropout{});
  } else {
    if (dropout_seed) launch(std::integral_constant<int, 32>{}, Dropout{});
    else launch(std::integral_constant<int, 32>{}, NoDropout{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lora_ext
