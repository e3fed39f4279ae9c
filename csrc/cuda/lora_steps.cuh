// The low-rank steps of LoRA on CUDA, each choosing its kernel:
//   shrink        out = alpha · dropout(X)·Wᵀ (tokens × r, float32): tensor cores where the operands allow
//                 (lora_shrink.cuh), else the general kernel (lora_gemm.cuh)
//   expand_add    C += alpha·L·Rᵀ (· keep): tensor cores for 16-bit C (lora_expand_wmma.cuh), else
//                 float32 FMAs (lora_expand.cuh)
//   token_reduce  Σ over tokens of Mᵀ·R: tensor cores for 16-bit M (lora_token_reduce_wmma.cuh), else
//                 float32 FMAs (lora_token_reduce.cuh)
#pragma once

#include <ATen/ATen.h>

#include "lora_expand.cuh"
#include "lora_expand_wmma.cuh"
#include "lora_gemm_launch.cuh"
#include "lora_shrink.cuh"
#include "lora_token_reduce.cuh"
#include "lora_token_reduce_wmma.cuh"

namespace lora_ext {
namespace cuda {

// Below this many tokens the tensor-core shrink has too few blocks to fill the GPU, and the general
// kernel's K split wins.
constexpr int64_t kShrinkWmmaMinTokens = 512;

// out (tokens × r, float32, contiguous) = alpha · dropout(x)·w_rkᵀ, where w_rk is a (r × K) view.
template <typename act_t, typename adapter_t>
void shrink(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_rk, double alpha, const int64_t* dropout_seed,
            uint32_t threshold) {
  const int64_t tokens = x.size(0), rank = w_rk.size(0), k = x.size(1);
  const bool dropout = dropout_seed != nullptr;
  int64_t done = 0;
  if constexpr (!std::is_same_v<act_t, float>) {
    if (tokens >= kShrinkWmmaMinTokens && shrink_wmma_supported(x, w_rk, rank)) {
      if (dropout) {
        launch_shrink_wmma<act_t, adapter_t, true>(out, x, w_rk, alpha, dropout_seed, threshold);
      } else {
        launch_shrink_wmma<act_t, adapter_t, false>(out, x, w_rk, alpha, nullptr, 0);
      }
      done = tokens / 16 * 16;
    }
  }
  if (done == tokens) return;
  const at::Tensor x_rest = x.narrow(0, done, tokens - done);
  at::Tensor out_rest = out.narrow(0, done, tokens - done);
  GemmParams p = gemm_params(x_rest, x_rest.stride(0), x_rest.stride(1), w_rk, w_rk.stride(1), w_rk.stride(0),
                             tokens - done, rank, k, alpha);
  if (dropout) {
    set_dropout(p, dropout_seed, threshold, done);
    gemm_store_float<act_t, adapter_t, DropoutAt::kOperandA>(p, out_rest);
  } else {
    gemm_store_float<act_t, adapter_t, DropoutAt::kNone>(p, out_rest);
  }
}

// c (M × N) += alpha · left·rightᵀ (· keep); left (M × r), right (N × r), any strides.
template <typename TL, typename TR, typename TC, bool DROPOUT>
void expand_add_step(const at::Tensor& c, const at::Tensor& left, const at::Tensor& right, double alpha,
                     const int64_t* dropout_seed = nullptr, uint32_t threshold = 0) {
  if constexpr (!std::is_same_v<TC, float>) {
    if (expand_wmma_supported(c, left, right)) {
      launch_expand_wmma<TC, TL, TR, DROPOUT>(c, left, right, alpha, dropout_seed, threshold);
      return;
    }
  }
  expand_add<TL, TR, TC, DROPOUT>(c, left, right, alpha, dropout_seed, threshold);
}

// out (C × r, float32, contiguous) = alpha · Σ_t keep · matrix[t, :]ᵀ right[t, :].
template <typename TM, bool DROPOUT>
void token_reduce_step(at::Tensor& out, const at::Tensor& matrix, const at::Tensor& right, double alpha,
                       const int64_t* dropout_seed = nullptr, uint32_t threshold = 0) {
  if (matrix.size(0) == 0) {
    out.zero_();
    return;
  }
  if constexpr (!std::is_same_v<TM, float>) {
    if (token_reduce_wmma_supported(matrix, right)) {
      launch_token_reduce_wmma<TM, DROPOUT>(out, matrix, right, alpha, dropout_seed, threshold);
      return;
    }
  }
  token_reduce<TM, DROPOUT>(out, matrix, right, alpha, dropout_seed, threshold);
}

}  // namespace cuda
}  // namespace lora_ext
