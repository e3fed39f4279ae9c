// CUDA backward of the LoRA linear layer (W and b frozen: no dW). dy·W goes to cuBLAS through ATen;
// the low-rank steps are our kernels (lora_steps.cuh), regenerating the forward's dropout mask from
// the same seed (dropout_mask.h).
//
//   dxa = s·dy·B;  dB = s·dyᵀ·xa;  dA = dxaᵀ·dropout(x);  dx = dy·W (cuBLAS) + keep·dxa·A/(1−p).
// dxa and dB come from one pass over dy where lora_dy_pass.cuh serves (r ≤ 16, ≥ 1024 columns), else from the
// shrink and the token reduction, one pass each. From 1024 tokens on Hopper, dx is one GEMM of our own over out + r
// (dy·W + keep·dxa·A, lora_gemm_sm90.h) instead of cuBLAS's dy·W and the expand's read and write of dx.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../checks.h"
#include "../no_autocast.h"
#include "dependent_launch.h"
#include "dropout_keep_bytes.cuh"
#include "lora_dy_pass.cuh"
#include "lora_gemm_sm90.h"
#include "lora_steps.cuh"
#include "lora_token_reduce_sm90.h"
#include "nvtx_range.h"
#include "rounded_copy.cuh"

namespace lora_ext {
namespace cuda {
namespace {

// LORA_EXT_DY_PASS=0 turns the one-pass dxa/dB kernel off (benchmarks compare both in one process); force takes it at
// every width it can run (the tests of its edges).
enum class DyPassSetting { kOff, kAuto, kForce };
DyPassSetting dy_pass_setting() {
  const char* setting = std::getenv("LORA_EXT_DY_PASS");
  if (setting == nullptr) return DyPassSetting::kAuto;
  if (std::strcmp(setting, "0") == 0) return DyPassSetting::kOff;
  if (std::strcmp(setting, "force") == 0) return DyPassSetting::kForce;
  return DyPassSetting::kAuto;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& lora_activation, double scaling, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed, bool compute_grad_x) {
  const char* op = "lora_ext::lora_backward";
  const LoraDims dims = check_lora_inputs(x, weight, c10::nullopt, lora_A, lora_B, op);
  check_scaling(scaling, op);
  check_dropout(dropout_p, dropout_seed, x, op);
  check_backward_inputs(grad_y, lora_activation, dims, x, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const NoAutocast no_autocast;  // at::matmul in dy's dtype (no_autocast.h)
  const NvtxRange range(op);
  // Our kernels as programmatic dependents of each other, where the call is large enough (dependent_launch.h).
  const DependentLaunchScope dependent_launch(dependent_launch_pays(dims.tokens, dims.in_features, dims.out_features));

  const auto float_options = x.options().dtype(at::kFloat);
  at::Tensor grad_activation = at::empty({dims.tokens, dims.rank}, float_options);
  // The adapter gradients in the adapters' dtype, written by the token reductions' last step (summed in float32,
  // rounded once). dA is computed transposed, through the (in × r) view of an (r × in) tensor: the reduction runs
  // over x's columns.
  const auto adapter_options = lora_A.options();
  at::Tensor grad_B = at::empty({dims.out_features, dims.rank}, adapter_options);
  at::Tensor grad_A = at::empty({dims.rank, dims.in_features}, adapter_options);
  at::Tensor grad_A_t = grad_A.t();
  const at::Tensor activation = lora_activation.contiguous();
  const int64_t* seed = dropout_p > 0.0 ? dropout_seed->data_ptr<int64_t>() : nullptr;
  // dx by the fused GEMM (after dxa, below), or by cuBLAS now and the expand kernel last.
  const bool fused_grad_x = compute_grad_x && x.scalar_type() == grad_y.scalar_type() &&
                            fused_lora_grad_x_usable(grad_y, weight, dims.rank);
  // With dropout, the fused dx reads x's mask as keep bytes (4 MB at 8192 × 4096, freed with the call), written by
  // the dA reduction below as it draws that mask, or by a kernel of their own where the reduction cannot.
  at::Tensor keep_bytes;
  if (fused_grad_x && seed != nullptr) keep_bytes = new_keep_bytes(dims.tokens, dims.in_features, x.options());
  at::Tensor grad_x = compute_grad_x && !fused_grad_x ? at::matmul(grad_y, weight) : at::empty({0}, x.options());
  const uint32_t threshold = dropout_threshold(dropout_p);
  const double keep_scale = dropout_keep_scale(dropout_p);
  // The fused dx GEMM's rank-r operand (keep_scale·dxa in dy's dtype, lora_gemm_operand's layout).
  at::Tensor scaled_grad_activation =
      fused_grad_x ? new_lora_gemm_operand(dims.tokens, dims.rank, grad_y.options()) : at::Tensor();
  bool scaled_operand_written = false;

  // The adapters transposed into contiguous copies (r × out and in × r; small): the tensor-core kernels read
  // them 16 bytes at a time along K and along the rank, where the strided views cost them 1.3–2.5× (r = 64).
  // Below kShrinkWmmaMinTokens the general kernels run and the two copies would only add launches. At r % 8 != 0
  // the expand reads A's ranks one by one anyway, so it takes Aᵀ as a view (its column loader) and skips the copy.
  const DyPassSetting dy_pass = dy_pass_setting();
  const bool one_pass_over_dy =
      dims.tokens >= kShrinkWmmaMinTokens && x.scalar_type() != at::kFloat && dy_pass != DyPassSetting::kOff &&
      dy_pass_supported(grad_y, lora_B, activation, dy_pass == DyPassSetting::kForce);
  const bool copy_transposes = dims.tokens >= kShrinkWmmaMinTokens;
  // Made only where a kernel reads them (each view or copy is a dispatcher call: host time per step).
  const auto transposed_A = [&] {
    const bool copy_A_t = copy_transposes && dims.rank % 8 == 0;
    return copy_A_t ? lora_A.t().contiguous() : lora_A.t();
  };
  const auto transposed_B = [&] {
    // dxa's shrink reads Bᵀ; where it goes to cuBLAS (shrink_on_cublas), cuBLAS takes the view as it is.
    const bool copy_B_t = copy_transposes && !shrink_on_cublas(grad_y.scalar_type(), lora_B.scalar_type(), dims.rank,
                                                               dims.tokens, /*dropout=*/false);
    return copy_B_t ? lora_B.t().contiguous() : lora_B.t();
  };

  dispatch_activation_and_adapter(x.scalar_type(), lora_A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
    using act_t = decltype(act_tag);
    using adapter_t = decltype(adapter_tag);
    bool done = false;
    if constexpr (!std::is_same_v<act_t, float>) {
      if (one_pass_over_dy) {
        RoundedCopy rounded;
        if (fused_grad_x && rounded_copy_enabled()) {  // the dx GEMM's operand keep_scale·dxa, by the pass's last kernel
          rounded = RoundedCopy{scaled_grad_activation.data_ptr(), scaled_grad_activation.stride(0),
                                static_cast<float>(keep_scale)};
        }
        scaled_operand_written =
            launch_dy_pass<act_t, adapter_t>(grad_activation, grad_B, grad_y, lora_B, activation, scaling, rounded);
        done = true;
      }
    }
    if (!done) {
      if (dims.tokens > 0) {
        // dxa[t, j] = s · Σ_o dy[t, o] · B[o, j]; the dx GEMM's operand keep_scale·dxa too where the kernel writes it
        // (its leading rows: the rest are rounded here).
        RoundedCopy rounded;
        if (fused_grad_x && rounded_copy_enabled()) {
          rounded = RoundedCopy{scaled_grad_activation.data_ptr(), scaled_grad_activation.stride(0),
                                static_cast<float>(keep_scale)};
        }
        const int64_t rounded_rows =
            shrink<act_t, adapter_t>(grad_activation, grad_y, transposed_B(), scaling, nullptr, 0, rounded);
        if (rounded_rows > 0) {
          finish_lora_gemm_operand(scaled_grad_activation, grad_activation, keep_scale, rounded_rows);
          scaled_operand_written = true;
        }
      }
      // dB[o, j] = s · Σ_t dy[t, o] · xa[t, j]
      token_reduce_step<act_t, false>(grad_B, grad_y, activation, scaling);
    }
    // dAᵀ[k, j] = Σ_t dropout(x)[t, k] · dxa[t, j]
    if (seed != nullptr) {
      // On Hopper where its setting admits it (token_reduce_sm90_pays), the pass over x streamed by the copy engine
      // with the mask drawn in shared memory (lora_token_reduce_sm90.h), on the dx GEMM's operand keep_scale·dxa (so
      // alpha = 1).
      bool done_sm90 = false;
      if constexpr (!std::is_same_v<act_t, float>) {
        if (keep_bytes.defined() && dims.tokens > 0) {
          if (!scaled_operand_written) finish_lora_gemm_operand(scaled_grad_activation, grad_activation, keep_scale, 0);
          scaled_operand_written = true;
          done_sm90 = token_reduce_sm90(grad_A_t, x, scaled_grad_activation, 1.0, seed, threshold,
                                        keep_bytes_out(keep_bytes));
        }
      }
      const bool wrote = done_sm90 || token_reduce_step<act_t, true>(grad_A_t, x, grad_activation, keep_scale, seed,
                                                                     threshold, keep_bytes_out(keep_bytes));
      if (keep_bytes.defined() && !wrote) launch_dropout_keep_bytes(keep_bytes, dims.in_features, seed, threshold);
    } else if (fused_grad_x && x.scalar_type() != at::kFloat && token_reduce_on_cublas(dims.rank, dims.tokens)) {
      // dA's product goes to cuBLAS here and takes dxa rounded to x's dtype: exactly the dx GEMM's operand
      // (keep_scale is 1 without dropout, so that operand is dxa itself), so it is rounded once for both.
      if (!scaled_operand_written) finish_lora_gemm_operand(scaled_grad_activation, grad_activation, keep_scale, 0);
      scaled_operand_written = true;
      if (!token_reduce_sm90(grad_A_t, x, scaled_grad_activation, 1.0, nullptr, 0, KeepBytesOut{})) {
        token_reduce_step<act_t, false>(grad_A_t, x, scaled_grad_activation, /*alpha=*/1.0);
      }
    } else {
      token_reduce_step<act_t, false>(grad_A_t, x, grad_activation, keep_scale);
    }
    if (compute_grad_x && !fused_grad_x && dims.tokens > 0) {
      // dx[t, k] += keep[t, k]/(1−p) · Σ_j dxa[t, j] · A[j, k]
      const at::Tensor lora_A_t = transposed_A();
      if (seed != nullptr) {
        expand_add_step<float, adapter_t, act_t, true>(grad_x, grad_activation, lora_A_t, keep_scale, seed, threshold);
      } else {
        expand_add_step<float, adapter_t, act_t, false>(grad_x, grad_activation, lora_A_t, keep_scale);
      }
    }
  });
  if (fused_grad_x) {
    // keep_scale·dxa rounded once to dy's dtype for the GEMM's K steps, as the forward rounds s·xa (written above by
    // the dy pass where it ran).
    if (!scaled_operand_written) finish_lora_gemm_operand(scaled_grad_activation, grad_activation, keep_scale, 0);
    grad_x = fused_lora_grad_x(grad_y, weight, scaled_grad_activation, lora_gemm_operand(lora_A, grad_y.scalar_type()),
                               keep_bytes);
  }
  return {grad_x, grad_A, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("lora_backward", &lora_backward_cuda); }

}  // namespace cuda
}  // namespace lora_ext
