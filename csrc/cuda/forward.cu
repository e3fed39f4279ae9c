// CUDA forward of the LoRA linear layer. The frozen base product x·Wᵀ + b goes to cuBLAS through ATen;
// the low-rank steps are our kernels (lora_steps.cuh), with the dropout mask drawn inside them from
// the seed (dropout_mask.h), never stored.
//
//   y = x·Wᵀ + b (cuBLAS);  xa = dropout(x)·Aᵀ (float32, saved for backward);  y += s·xa·Bᵀ (in place).
// Two shapes take kernels of our own for the base product as well: from 4096 tokens on Hopper the fused GEMM
// (lora_gemm_sm90.h), and at 1–16 tokens one launch for the whole layer (lora_decode_gemv.cuh). Up to 64 tokens
// without dropout (48 above r = 32), the low-rank steps are one clustered launch after cuBLAS (one_adapter_decode.h);
// with dropout, up to 32 tokens, lora_decode.cuh's.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../checks.h"
#include "../no_autocast.h"
#include "dependent_launch.h"
#include "lora_decode.cuh"
#include "lora_decode_gemv.cuh"
#include "lora_gemm_sm90.h"
#include "lora_steps.cuh"
#include "nvtx_range.h"
#include "one_adapter_decode.h"
#include "rounded_copy.cuh"

namespace lora_ext {
namespace cuda {
namespace {

// LORA_EXT_DECODE_GEMV=0 turns the one-launch decoding path off (benchmarks compare both in one process).
bool decode_gemv_enabled() {
  const char* setting = std::getenv("LORA_EXT_DECODE_GEMV");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                                     const c10::optional<at::Tensor>& dropout_seed) {
  const char* op = "lora_ext::lora_forward";
  const LoraDims dims = check_lora_inputs(x, weight, bias, lora_A, lora_B, op);
  check_scaling(scaling, op);
  check_dropout(dropout_p, dropout_seed, x, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const NoAutocast no_autocast;  // at::linear in x's dtype (no_autocast.h)
  const NvtxRange range(op);
  // Our kernels as programmatic dependents of each other, where the call is large enough (dependent_launch.h).
  const DependentLaunchScope dependent_launch(dependent_launch_pays(dims.tokens, dims.in_features, dims.out_features));

  at::Tensor lora_activation = at::empty({dims.tokens, dims.rank}, x.options().dtype(at::kFloat));
  const int64_t* seed = dropout_p > 0.0 ? dropout_seed->data_ptr<int64_t>() : nullptr;
  if (fused_lora_gemm_usable(x, weight, bias, dims.rank)) {
    // Hopper: xa by our shrink, then one GEMM over in + r for y = x·Wᵀ + b + (s·xa)·Bᵀ (lora_gemm_sm90.h). The
    // shrink also writes s·xa in x's dtype, the GEMM's operand, where its tensor-core kernel runs.
    at::Tensor scaled_activation = new_lora_gemm_operand(dims.tokens, dims.rank, x.options());
    int64_t scaled_rows = 0;
    dispatch_activation_and_adapter(x.scalar_type(), lora_A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
      using act_t = decltype(act_tag);
      using adapter_t = decltype(adapter_tag);
      const RoundedCopy rounded = rounded_copy_enabled() ? RoundedCopy{scaled_activation.data_ptr(),
                                                                        scaled_activation.stride(0),
                                                                        static_cast<float>(scaling)}
                                                          : RoundedCopy{};
      scaled_rows = shrink<act_t, adapter_t>(lora_activation, x, lora_A, dropout_keep_scale(dropout_p), seed,
                                             dropout_threshold(dropout_p), rounded);
    });
    finish_lora_gemm_operand(scaled_activation, lora_activation, scaling, scaled_rows);
    const at::Tensor y = fused_lora_gemm(x, weight, bias, scaled_activation, lora_gemm_operand(lora_B, x.scalar_type()));
    return {y, lora_activation};
  }

  if (decode_gemv_shape_supported(x, weight, bias, lora_A, lora_B, dropout_p) && decode_gemv_enabled()) {
    // A few tokens: the base product and the low-rank terms in one launch (lora_decode_gemv.cuh).
    at::Tensor y = launch_decode_gemv(lora_activation, x, weight, bias, lora_A, lora_B, scaling);
    if (y.defined()) return {y, lora_activation};
  }

  at::Tensor y = at::linear(x, weight, bias);
  if (dims.tokens == 0) return {y, lora_activation};
  // A few tokens without dropout: the multi-adapter decoding kernel with one slot, launched right after the GEMM
  // (its programmatic dependent; one_adapter_decode.h).
  if (dropout_p == 0.0 && launch_one_adapter_decode(y, lora_activation, x, lora_A, lora_B, scaling)) {
    return {y, lora_activation};
  }

  dispatch_activation_and_adapter(x.scalar_type(), lora_A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
    using act_t = decltype(act_tag);
    using adapter_t = decltype(adapter_tag);
    if constexpr (!std::is_same_v<act_t, float>) {
      if (decode_supported(x, lora_A, lora_B, y)) {  // a few tokens: one fused launch
        launch_decode<act_t, adapter_t>(y, lora_activation, x, lora_A, lora_B, scaling, dropout_keep_scale(dropout_p),
                                        seed, dropout_threshold(dropout_p));
        return;
      }
    }
    // xa[t, j] = Σ_k dropout(x)[t, k] · A[j, k]
    shrink<act_t, adapter_t>(lora_activation, x, lora_A, dropout_keep_scale(dropout_p), seed,
                             dropout_threshold(dropout_p));
    // y[t, o] += s · Σ_j xa[t, j] · B[o, j]
    expand_add_step<float, adapter_t, act_t, false>(y, lora_activation, lora_B, scaling);
  });
  return {y, lora_activation};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("lora_forward", &lora_forward_cuda); }

}  // namespace cuda
}  // namespace lora_ext
