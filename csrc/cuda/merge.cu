// CUDA merge and unmerge, W ±= s·B·A in place, and the dropout keep mask as a tensor.
// Merge is one expand-add pass over W (out × in, rank r; lora_expand.cuh): each element of W is read
// and written once, the rank-r sum is accumulated in float32, and the result rounded once into W.
#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "lora_steps.cuh"
#include "nvtx_range.h"

namespace lora_ext {
namespace cuda {
namespace {

void merge_impl(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                const char* op) {
  check_merge_inputs(weight, lora_A, lora_B, op);
  check_scaling(scaling, op);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const NvtxRange range(op);
  dispatch_activation_and_adapter(weight.scalar_type(), lora_A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
    using act_t = decltype(act_tag);
    using adapter_t = decltype(adapter_tag);
    // W[o, k] += s · Σ_j B[o, j] · A[j, k]. float32 adapters keep every bit of A and B: float32 FMAs.
    if constexpr (std::is_same_v<adapter_t, float>) {
      expand_add<adapter_t, adapter_t, act_t, false>(weight, lora_B, lora_A.t(), scaling);
    } else {
      expand_add_step<adapter_t, adapter_t, act_t, false>(weight, lora_B, lora_A.t(), scaling);
    }
  });
}

void merge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  merge_impl(weight, lora_A, lora_B, scaling, "lora_ext::merge_");
}

void unmerge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  merge_impl(weight, lora_A, lora_B, -scaling, "lora_ext::unmerge_");
}

// One thread per element; the mask op exists for tests and inspection, not the hot path.
__global__ void dropout_keep_mask_kernel(bool* mask, const int64_t* seed, int64_t rows, int64_t cols,
                                         uint32_t threshold) {
  const int64_t total = rows * cols;
  const uint64_t seed_value = static_cast<uint64_t>(*seed);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    mask[i] = dropout_keep(seed_value, i / cols, i % cols, threshold);
  }
}

at::Tensor dropout_keep_mask_cuda(const at::Tensor& dropout_seed, int64_t rows, int64_t cols, double dropout_p) {
  const char* op = "lora_ext::dropout_keep_mask";
  LORA_CHECK(rows >= 0 && cols >= 0, op, ": rows and cols must be >= 0, got ", rows, " and ", cols);
  LORA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  LORA_CHECK(dropout_seed.scalar_type() == at::kLong && dropout_seed.numel() == 1, op,
              ": dropout_seed must be an int64 tensor with one element");
  const c10::cuda::CUDAGuard device_guard(dropout_seed.device());
  at::Tensor mask = at::empty({rows, cols}, dropout_seed.options().dtype(at::kBool));
  if (mask.numel() == 0) return mask;
  const int64_t blocks = std::min<int64_t>(ceil_div(mask.numel(), 256), 65535);
  dropout_keep_mask_kernel<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.data_ptr<bool>(), dropout_seed.data_ptr<int64_t>(), rows, cols, dropout_threshold(dropout_p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("merge_", &merge_cuda);
  m.impl("unmerge_", &unmerge_cuda);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cuda);
}

}  // namespace cuda
}  // namespace lora_ext
