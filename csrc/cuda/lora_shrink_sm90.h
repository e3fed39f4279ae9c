// The shrink (a 16-bit activation's rank-r projection) on Hopper: the copy engine streams X in 64-row tiles through
// a pipeline of shared-memory stages and warpgroup MMAs multiply them by W's slice (lora_shrink_sm90.cu).
//
//   out (tokens × r, float32) = alpha · X·Wᵀ        forward  xa  = x·Aᵀ     (X = x,  W = A,  r × in, K-contiguous)
//                                                   backward dxa = s·dy·B   (X = dy, W = Bᵀ, a view of B: N-contiguous)
//
// It reads X once, at the ≈ 2.2–2.3 TB/s that every reader of a 64 MB activation gets on an H100 (docs/perf-notes.md
// v21), in one launch that also writes the fused GEMMs' rank-r operand (RoundedCopy), which cuBLAS's path leaves to a
// rounding kernel. With dropout (forward only), the mask is drawn in shared memory while the copy engine streams the
// next tiles, instead of by the warps that load them.
#pragma once

#include <ATen/ATen.h>

#include "rounded_copy.cuh"

namespace lora_ext {
namespace cuda {

// out = alpha · x·w_rkᵀ (+ rounded) by the Hopper shrink, if it takes these operands: a build with an sm_90a image
// loaded on a compute-capability-9.0 GPU, x and w_rk of one 16-bit dtype, x's rows 16-byte aligned with unit column
// stride, w_rk (r × K, r ≤ 64) with unit stride along K (rows 16-byte aligned) or along r (r a multiple of 8: a view
// Bᵀ of a row-major B), out contiguous float32, and a call where it pays (shrink_sm90_pays: with dropout from 4096
// tokens; without dropout (every rank ≤ 64 since v23) in calls of 1024 tokens up to tokens · K < 2^25). LORA_EXT_SHRINK_SM90=0: never;
// =force: from one token, at any rank (the tests); =1: from 1024 tokens whether it pays or not (the benchmarks). dropout_seed
// (nullptr: none) and dropout_threshold as dropout_mask.h draws the mask of X; alpha then includes the keep scale.
// Returns false, having done nothing, where it does not take them.
bool shrink_sm90(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_rk, double alpha, const RoundedCopy& rounded,
                 const int64_t* dropout_seed, uint32_t dropout_threshold);

}  // namespace cuda
}  // namespace lora_ext
