// CUDA backward of the LoRA linear layer (W and b frozen: no dW). dy·W goes to cuBLAS through ATen;
// the low-rank steps are lora_gemm_kernel (lora_gemm.cuh), regenerating the forward's dropout mask
// from the same seed (dropout_mask.h).
//
//   dxa = s·dy·B;  dB = s·dyᵀ·xa;  dA = dxaᵀ·dropout(x);  dx = dy·W (cuBLAS) + keep·dxa·A/(1−p).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "lora_gemm_launch.cuh"
#include "nvtx_range.h"

namespace lora_ext {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& lora_activation, double scaling, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed, bool compute_grad_x) {
  const char* op = "lora_ext::lora_backward";
  const LoraDims dims = check_lora_inputs(x, weight, c10::nullopt, lora_A, lora_B, op);
  check_dropout(dropout_p, dropout_seed, x, op);
  check_backward_inputs(grad_y, lora_activation, dims, x, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const NvtxRange range(op);

  const auto float_options = x.options().dtype(at::kFloat);
  at::Tensor grad_activation = at::empty({dims.tokens, dims.rank}, float_options);
  at::Tensor grad_B_float = at::empty({dims.out_features, dims.rank}, float_options);
  // dA is computed transposed, (in, r), so that its K split (over tokens) writes contiguous partials.
  at::Tensor grad_A_t_float = at::empty({dims.in_features, dims.rank}, float_options);
  at::Tensor grad_x = compute_grad_x ? at::matmul(grad_y, weight) : at::empty({0}, x.options());

  dispatch_activation_and_adapter(x.scalar_type(), lora_A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
    using act_t = decltype(act_tag);
    using adapter_t = decltype(adapter_tag);
    // dxa[t, j] = s · Σ_o dy[t, o] · B[o, j]
    const GemmParams grad_act = gemm_params(grad_y, grad_y.stride(0), grad_y.stride(1), lora_B, lora_B.stride(0),
                                            lora_B.stride(1), dims.tokens, dims.rank, dims.out_features, scaling);
    gemm_store_float<act_t, adapter_t, DropoutAt::kNone>(grad_act, grad_activation);
    // dB[o, j] = s · Σ_t dy[t, o] · xa[t, j]
    const GemmParams grad_b =
        gemm_params(grad_y, grad_y.stride(1), grad_y.stride(0), lora_activation, lora_activation.stride(0),
                    lora_activation.stride(1), dims.out_features, dims.rank, dims.tokens, scaling);
    gemm_store_float<act_t, float, DropoutAt::kNone>(grad_b, grad_B_float);
    // dAᵀ[k, j] = Σ_t dropout(x)[t, k] · dxa[t, j]
    GemmParams grad_a = gemm_params(x, x.stride(1), x.stride(0), grad_activation, grad_activation.stride(0),
                                    grad_activation.stride(1), dims.in_features, dims.rank, dims.tokens,
                                    1.0 / (1.0 - dropout_p));
    if (dropout_p > 0.0) {
      set_dropout(grad_a, *dropout_seed, dropout_p);
      gemm_store_float<act_t, float, DropoutAt::kOperandATransposed>(grad_a, grad_A_t_float);
    } else {
      gemm_store_float<act_t, float, DropoutAt::kNone>(grad_a, grad_A_t_float);
    }
    if (compute_grad_x) {
      // dx[t, k] += keep[t, k]/(1−p) · Σ_j dxa[t, j] · A[j, k]
      GemmParams grad_x_lora = gemm_params(grad_activation, grad_activation.stride(0), grad_activation.stride(1),
                                           lora_A, lora_A.stride(0), lora_A.stride(1), dims.tokens, dims.in_features,
                                           dims.rank, 1.0 / (1.0 - dropout_p));
      if (dropout_p > 0.0) {
        set_dropout(grad_x_lora, *dropout_seed, dropout_p);
        gemm_accumulate<float, adapter_t, act_t, DropoutAt::kOutput>(grad_x_lora, grad_x);
      } else {
        gemm_accumulate<float, adapter_t, act_t, DropoutAt::kNone>(grad_x_lora, grad_x);
      }
    }
  });
  const auto adapter_dtype = lora_A.scalar_type();
  return {grad_x, grad_A_t_float.t().to(adapter_dtype).contiguous(), grad_B_float.to(adapter_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("lora_backward", &lora_backward_cuda); }

}  // namespace cuda
}  // namespace lora_ext
