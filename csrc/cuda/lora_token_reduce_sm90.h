// The backward's dA reduction on Hopper: dAᵀ (in × r) = alpha · Σ_t keep(x)[t, :]ᵀ · G[t, :], where G is the dx GEMM's
// rank-r operand (keep_scale·dxa in x's dtype, lora_gemm_operand's layout) and keep(x) the forward's dropout mask
// regenerated on x's tiles (lora_token_reduce_sm90.cu). It writes the mask's keep bytes for the fused dx GEMM as it
// draws them, as the tensor-core reduction does.
#pragma once

#include <ATen/ATen.h>

#include "dropout_keep_bytes.cuh"

namespace lora_ext {
namespace cuda {

// out (in × r: any strides, the adapters' dtype) = alpha · Σ_t keep(x)[t, :]ᵀ · g[t, :], summed in float32 and
// rounded once, if the Hopper kernel takes these operands: a build with an sm_90a image loaded on a
// compute-capability-9.0 GPU, x and g of one 16-bit dtype, rows 16-byte aligned with unit column stride, in % 8 == 0,
// r ≤ 64, and a call the setting admits. With dropout_seed (nullptr: keep = 1), keep is the forward's mask
// (dropout_mask.h), and its keep bytes go to keep_out where set. g is the dx GEMM's operand keep_scale·dxa, already
// rounded to x's dtype: where the tensor-core reduction computes keep_scale · Σ keep·x·dxa, this sums
// keep·x·round(keep_scale·dxa) (the same up to that rounding).
// LORA_EXT_TOKEN_REDUCE_SM90 unset or auto: where it pays (token_reduce_sm90_pays: with dropout, ranks 17–64 from
// 4096 tokens, where the fused dx GEMM runs); =0: never; =1: from 4096 tokens at any rank (the benchmarks); =force:
// from one token (the tests). Without dropout the backward reaches it only where dA would go to cuBLAS (≥ 512
// tokens, r ≥ LORA_EXT_CUBLAS_MIN_RANK, 17 by default). Returns false, having done nothing, where it does not take
// them.
bool token_reduce_sm90(at::Tensor& out, const at::Tensor& x, const at::Tensor& g, double alpha,
                       const int64_t* dropout_seed, uint32_t dropout_threshold, KeepBytesOut keep_out);

}  // namespace cuda
}  // namespace lora_ext
