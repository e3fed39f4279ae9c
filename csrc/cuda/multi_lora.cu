// CUDA kernels of lora_ext::multi_lora_forward (multi-adapter batches, inference): each token names its
// adapter slot. NOT YET RUN ON A GPU (written in session 3 without one): the first, simple version, to be tested
// against the CPU kernel and the float64 reference (tests/test_multi_adapter.py), then measured and tuned.
//
// y = x·Wᵀ + b comes from cuBLAS (at::linear); then two launches, both reading the ids on the device (no host
// sync, so CUDA graphs can capture the call) and touching only the slots the tokens name, so the cost does not
// depend on how many adapters are loaded:
//   shrink: one block per token, xa[t, :] = x[t]·A[a]ᵀ in float32 (Punica's BGMV shape);
//   expand: y[t, o] = round(y[t, o] + s[a]·Σ_j xa[t, j]·B[a][o, j]), one rounding of the float32 sum.
// Ids outside [-1, n) are treated as -1 (the base layer alone): checking them would need a sync.
// Known limits of this version: A[a] is re-read from L2 for every token (prefill wants SGMV-style tiles of
// tokens sharing an adapter, on tensor cores), and B is read with a stride of r_max between threads.
#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "lora_gemm_launch.cuh"
#include "nvtx_range.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / 32;
constexpr int kRankChunk = 16;  // ranks accumulated per pass over x[t]
constexpr int kExpandThreads = 256;

template <typename IdT>
__device__ __forceinline__ int64_t slot_of(const IdT* ids, int64_t t, int64_t adapters) {
  const int64_t a = static_cast<int64_t>(ids[t]);
  return (a >= 0 && a < adapters) ? a : -1;
}

template <typename T, typename TW, typename IdT>
__global__ void __launch_bounds__(kShrinkThreads)
    multi_lora_shrink_kernel(const T* __restrict__ x, int64_t x_stride, const TW* __restrict__ A, int64_t in,
                             int64_t rank, int64_t adapters, const IdT* __restrict__ ids, float* __restrict__ xa) {
  const int64_t t = blockIdx.x;
  float* out = xa + t * rank;
  const int64_t a = slot_of(ids, t, adapters);
  if (a < 0) {
    for (int64_t j = threadIdx.x; j < rank; j += kShrinkThreads) out[j] = 0.f;
    return;
  }
  const T* xt = x + t * x_stride;
  const TW* At = A + a * rank * in;
  __shared__ float partial[kShrinkWarps][kRankChunk];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t j0 = 0; j0 < rank; j0 += kRankChunk) {
    float acc[kRankChunk];
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) acc[j] = 0.f;
    for (int64_t k = threadIdx.x; k < in; k += kShrinkThreads) {
      const float xv = static_cast<float>(xt[k]);
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j)
        if (j0 + j < rank) acc[j] = fmaf(xv, static_cast<float>(At[(j0 + j) * in + k]), acc[j]);
    }
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) {
      float v = acc[j];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][j] = v;
    }
    __syncthreads();
    if (threadIdx.x < kRankChunk && j0 + threadIdx.x < rank) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kShrinkWarps; ++w) sum += partial[w][threadIdx.x];
      out[j0 + threadIdx.x] = sum;
    }
    __syncthreads();
  }
}

template <typename T, typename TW, typename IdT>
__global__ void __launch_bounds__(kExpandThreads)
    multi_lora_expand_kernel(T* __restrict__ y, int64_t out_features, const float* __restrict__ xa,
                             const TW* __restrict__ B, int64_t rank, int64_t adapters, const IdT* __restrict__ ids,
                             const float* __restrict__ scalings) {
  const int64_t t = blockIdx.x;  // tokens on x (up to 2^31 - 1 blocks), output tiles on y
  const int64_t a = slot_of(ids, t, adapters);
  if (a < 0) return;
  extern __shared__ float xa_row[];  // rank floats
  for (int64_t j = threadIdx.x; j < rank; j += kExpandThreads) xa_row[j] = xa[t * rank + j];
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= out_features) return;
  const TW* Bo = B + (a * out_features + o) * rank;
  float acc = 0.f;
  for (int64_t j = 0; j < rank; ++j) acc = fmaf(xa_row[j], static_cast<float>(Bo[j]), acc);
  T* yo = y + t * out_features + o;
  // s·Σ rounded, then added and rounded once into y's dtype, as the CPU kernel does (no FMA contraction).
  *yo = static_cast<T>(__fadd_rn(static_cast<float>(*yo), __fmul_rn(scalings[a], acc)));
}

at::Tensor multi_lora_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& lora_A_stack, const at::Tensor& lora_B_stack,
                                   const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  const char* op = "lora_ext::multi_lora_forward";
  const MultiLoraDims d =
      check_multi_lora_inputs(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const NvtxRange range(op);
  at::Tensor y = at::linear(x, weight, bias).contiguous();
  if (d.tokens == 0 || d.max_rank == 0) return y;
  const at::Tensor x_c = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor A = lora_A_stack.contiguous(), B = lora_B_stack.contiguous();
  const at::Tensor ids = adapter_ids.contiguous();
  const at::Tensor scale = scalings.to(at::kFloat).contiguous();  // a device op: no sync
  at::Tensor xa = at::empty({d.tokens, d.max_rank}, x.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 expand_grid(static_cast<unsigned>(d.tokens),
                         static_cast<unsigned>((d.out_features + kExpandThreads - 1) / kExpandThreads));
  const size_t expand_smem = static_cast<size_t>(d.max_rank) * sizeof(float);
  LORA_CHECK(expand_smem <= 48 * 1024, op, ": r_max = ", d.max_rank, " is over this kernel's limit of ",
             48 * 1024 / sizeof(float));
  LORA_CHECK(expand_grid.y <= 65535u, op, ": out_features = ", d.out_features, " is over this kernel's limit");
  LORA_CHECK(d.tokens <= INT32_MAX, op, ": at most 2^31 - 1 tokens per call, got ", d.tokens);
  dispatch_activation_and_adapter(x.scalar_type(), A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
    using T = decltype(act_tag);
    using TW = decltype(adapter_tag);
    const auto launch = [&](auto id_tag) {
      using IdT = decltype(id_tag);
      multi_lora_shrink_kernel<T, TW, IdT><<<static_cast<unsigned>(d.tokens), kShrinkThreads, 0, stream>>>(
          x_c.data_ptr<T>(), x_c.stride(0), A.data_ptr<TW>(), d.in_features, d.max_rank, d.adapters,
          ids.data_ptr<IdT>(), xa.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      multi_lora_expand_kernel<T, TW, IdT><<<expand_grid, kExpandThreads, expand_smem, stream>>>(
          y.data_ptr<T>(), d.out_features, xa.data_ptr<float>(), B.data_ptr<TW>(), d.max_rank, d.adapters,
          ids.data_ptr<IdT>(), scale.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (ids.scalar_type() == at::kLong) {
      launch(int64_t{});
    } else {
      launch(int32_t{});
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("multi_lora_forward", &multi_lora_forward_cuda); }

}  // namespace cuda
}  // namespace lora_ext
