// The low-rank steps of LoRA on CUDA, each choosing its kernel:
//   shrink        out = alpha · dropout(X)·Wᵀ (tokens × r, float32): tensor cores where the operands allow
//                 (lora_shrink.cuh), else the general kernel (lora_gemm.cuh)
//   expand_add    C += alpha·L·Rᵀ (· keep): tensor cores for 16-bit C (lora_expand_wmma.cuh), else
//                 float32 FMAs (lora_expand.cuh)
//   token_reduce  Σ over tokens of Mᵀ·R: tensor cores for 16-bit M (lora_token_reduce_wmma.cuh), else
//                 float32 FMAs (lora_token_reduce.cuh)
#pragma once

#include <cstdlib>
#include <cstring>

#include <ATen/ATen.h>
#include <torch/version.h>

#include <vector>

#include "lora_expand.cuh"
#include "lora_expand_wmma.cuh"
#include "lora_gemm_launch.cuh"
#include "lora_shrink.cuh"
#include "lora_shrink_sm90.h"
#include "lora_token_reduce.cuh"
#include "lora_token_reduce_wmma.cuh"

namespace lora_ext {
namespace cuda {

// Below this many tokens the tensor-core shrink has too few blocks to fill the GPU, and the general
// kernel's K split wins.
constexpr int64_t kShrinkWmmaMinTokens = 512;
// The tensor-core kernels stage at most this many ranks at once (shared memory); larger ranks go in chunks.
constexpr int64_t kWmmaMaxRank = 64;

// From this rank up, the shrink and the token reduction without dropout go to cuBLAS (16-bit operands, float32
// accumulation and output: aten::mm.dtype), which streams X at these ranks faster than our tensor-core kernels; the
// results keep their meaning: float32 sums of 16-bit products, scaled in float32. With dropout, our kernels draw the
// mask inside the pass instead of materialising it. Measured on an H100 (8192 tokens, 4096², training steps as ratios
// to the frozen base layer): from r = 64 in v6; in v19 for every rank above the one-pass dy kernel's 16, e.g. r = 20
// 1.23× → 1.21×, r = 24 1.23× → 1.18×, r = 32 1.22× → 1.15×, r = 48 1.36× → 1.18× (docs/perf-notes.md v19).
constexpr int64_t kCublasMinRank = 17;

// LORA_EXT_CUBLAS_MIN_RANK overrides kCublasMinRank (tests run our kernels at these ranks with it, benchmarks compare
// both). Read per call, only where the answer depends on it.
inline int64_t cublas_min_rank() {
  const char* setting = std::getenv("LORA_EXT_CUBLAS_MIN_RANK");
  return setting != nullptr ? static_cast<int64_t>(std::atoll(setting)) : kCublasMinRank;
}

// out (rows × r, float32, contiguous) = alpha · left·right, 16-bit operands, on cuBLAS. From torch 2.11 (the version
// this was measured with; 2.8 and 2.9 refuse a float32 `self` here) alpha scales cuBLAS's float32 sums inside the
// GEMM (aten::addmm.dtype, beta = 0: out is not read), which saves a scaling kernel per call. Float32 output only: a
// 16-bit output may be split-K-reduced in 16 bits under PyTorch's default reduced-precision reduction setting.
inline void mm_float_out(at::Tensor& out, const at::Tensor& left, const at::Tensor& right, double alpha) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
  at::addmm_out(out, out, left, right, at::kFloat, /*beta=*/0, /*alpha=*/alpha);
#else
  at::mm_out(out, left, right, at::kFloat);
  if (alpha != 1.0) out.mul_(alpha);
#endif
}

// Between the decoding kernels' range and kShrinkWmmaMinTokens, shrink() hands x·Wᵀ to cuBLAS at every rank (16-bit
// x and W of x's dtype, no dropout): there our general kernel's K split lost to it by 0.3–0.6 of the base layer's time
// (H100, 4096², inference in a CUDA graph, 65–511 tokens: r = 16 1.75–2.03× → 1.37–1.47×, r = 64 1.87–2.15× →
// 1.41–1.52×; docs/perf-notes.md v19). Float32 W stays on our kernel, which does not round it to x's dtype.
// LORA_EXT_CUBLAS_SHRINK=0 turns this off (tests keep the general kernel under test at these sizes).
constexpr int64_t kCublasShrinkMinTokens = 65;

inline bool small_shrink_on_cublas_enabled() {
  const char* setting = std::getenv("LORA_EXT_CUBLAS_SHRINK");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

// Whether shrink() hands x·Wᵀ to cuBLAS for these operands (kCublasMinRank, kCublasShrinkMinTokens).
inline bool shrink_on_cublas(at::ScalarType x_dtype, at::ScalarType w_dtype, int64_t rank, int64_t tokens,
                             bool dropout) {
  if (x_dtype == at::kFloat || dropout) return false;
  if (tokens >= kShrinkWmmaMinTokens) return rank >= cublas_min_rank();
  return tokens >= kCublasShrinkMinTokens && w_dtype == x_dtype && small_shrink_on_cublas_enabled();
}

// Whether token_reduce_step() hands its product to cuBLAS (16-bit operands, no dropout; kCublasMinRank).
inline bool token_reduce_on_cublas(int64_t rank, int64_t tokens) {
  return tokens >= kShrinkWmmaMinTokens && rank >= cublas_min_rank();
}

// out (tokens × r, float32, contiguous) = alpha · dropout(x)·w_rkᵀ, where w_rk is a (r × K) view. With `rounded`
// (x's dtype), the tensor-core kernel also writes its rows of out · rounded.scale there; returns how many leading rows
// it wrote (0 where another path ran): the caller fills the rest.
template <typename act_t, typename adapter_t>
int64_t shrink(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_rk, double alpha, const int64_t* dropout_seed,
               uint32_t threshold, RoundedCopy rounded = {}) {
  const int64_t tokens = x.size(0), rank = w_rk.size(0), k = x.size(1);
  const bool dropout = dropout_seed != nullptr;
  if constexpr (!std::is_same_v<act_t, float>) {
    // Hopper, where it pays: the copy engine's stream of x through warpgroup MMAs (lora_shrink_sm90.h).
    if (shrink_sm90(out, x, w_rk, alpha, rounded, dropout_seed, threshold)) return rounded.out != nullptr ? tokens : 0;
    if (shrink_on_cublas(x.scalar_type(), w_rk.scalar_type(), rank, tokens, dropout)) {
      // W rounded to X's type first (a small copy for float32 adapters), as our kernels do when staging it.
      mm_float_out(out, x, w_rk.to(x.scalar_type()).t(), alpha);
      return 0;
    }
    if (rank > kWmmaMaxRank && tokens >= kShrinkWmmaMinTokens) {
      // One pass over x per 64 ranks, each into a contiguous block that is then copied into out's columns:
      // another read of x costs less than the general kernel does at these ranks.
      for (int64_t j0 = 0; j0 < rank; j0 += kWmmaMaxRank) {
        const int64_t chunk = std::min(kWmmaMaxRank, rank - j0);
        at::Tensor part = at::empty({tokens, chunk}, out.options());
        shrink<act_t, adapter_t>(part, x, w_rk.narrow(0, j0, chunk), alpha, dropout_seed, threshold);
        out.narrow(1, j0, chunk).copy_(part);
      }
      return 0;
    }
  }
  int64_t done = 0, rounded_rows = 0;
  if constexpr (!std::is_same_v<act_t, float>) {
    if (tokens >= kShrinkWmmaMinTokens && shrink_wmma_supported(x, w_rk, rank)) {
      if (dropout) {
        launch_shrink_wmma<act_t, adapter_t, true>(out, x, w_rk, alpha, dropout_seed, threshold, rounded);
      } else {
        launch_shrink_wmma<act_t, adapter_t, false>(out, x, w_rk, alpha, nullptr, 0, rounded);
      }
      done = tokens / 16 * 16;
      if (rounded.out != nullptr) rounded_rows = done;
    }
  }
  if (done == tokens) return rounded_rows;
  const at::Tensor x_rest = x.narrow(0, done, tokens - done);
  at::Tensor out_rest = out.narrow(0, done, tokens - done);
  auto run_general = [&](const at::Tensor& w, auto w_tag) {
    using w_t = decltype(w_tag);
    GemmParams p = gemm_params(x_rest, x_rest.stride(0), x_rest.stride(1), w, w.stride(1), w.stride(0), tokens - done,
                               rank, k, alpha);
    if (dropout) {
      set_dropout(p, dropout_seed, threshold, done);
      gemm_store_float<act_t, w_t, DropoutAt::kOperandA>(p, out_rest);
    } else {
      gemm_store_float<act_t, w_t, DropoutAt::kNone>(p, out_rest);
    }
  };
  if constexpr (!std::is_same_v<act_t, float> && std::is_same_v<adapter_t, float>) {
    if (done > 0) {
      // The tail of a call whose other rows the tensor-core kernel took: W rounded to x's type as that kernel rounds
      // it when staging, so a token's result does not depend on whether it falls in the last tokens % 16 rows (with
      // float32 W the tail differed from the other rows by ≈ 1e-4, relative).
      run_general(w_rk.to(x.scalar_type()), act_t{});
      return rounded_rows;
    }
  }
  run_general(w_rk, adapter_t{});
  return rounded_rows;
}

// c (M × N) += alpha · left·rightᵀ (· keep); left (M × r), right (N × r), any strides.
template <typename TL, typename TR, typename TC, bool DROPOUT>
void expand_add_step(const at::Tensor& c, const at::Tensor& left, const at::Tensor& right, double alpha,
                     const int64_t* dropout_seed = nullptr, uint32_t threshold = 0) {
  if constexpr (!std::is_same_v<TC, float>) {
    // Any rank up to 128: r % 8 != 0 is read with zeros past r (lora_expand_wmma.cuh), not copied padded.
    if (expand_wmma_supported(c, left, right)) {
      launch_expand_wmma<TC, TL, TR, DROPOUT>(c, left, right, alpha, dropout_seed, threshold);
      return;
    }
    // Operand views neither loader can read (e.g. an adapter sliced at an odd offset): contiguous copies of these
    // small operands cost far less than the general kernel. Made only where the output suits the kernel, so the
    // general kernel's callers (out % 8 != 0, …) pay no copies they would not use.
    if (expand_wmma_output_supported(c, left, right)) {
      const at::Tensor left_copy = left.contiguous(), right_copy = right.contiguous();
      if (expand_wmma_supported(c, left_copy, right_copy)) {
        launch_expand_wmma<TC, TL, TR, DROPOUT>(c, left_copy, right_copy, alpha, dropout_seed, threshold);
        return;
      }
    }
  }
  expand_add<TL, TR, TC, DROPOUT>(c, left, right, alpha, dropout_seed, threshold);
}

// Runs `compute` on a float32 contiguous (rows × r) tensor: `out` itself when it is one, else a temporary copied into
// out afterwards (one rounding to out's type).
template <typename Compute>
void into_float_contiguous(at::Tensor& out, Compute&& compute) {
  if (out.scalar_type() == at::kFloat && out.is_contiguous()) {
    compute(out);
    return;
  }
  at::Tensor temporary = at::empty(out.sizes(), out.options().dtype(at::kFloat));
  compute(temporary);
  out.copy_(temporary);
}

// out (C × r; float32, float16 or bfloat16; any strides) = alpha · Σ_t keep · matrix[t, :]ᵀ right[t, :], summed in
// float32 and rounded once to out's type. The tensor-core path writes out directly (its partial sums are added by a
// kernel that also casts and transposes), so the backward passes the adapters' gradients themselves. With dropout and
// keep_out set, returns whether the keep bytes of matrix's mask were written along the way (the tensor-core path
// writes them; the others do not, and the caller draws them itself).
template <typename TM, bool DROPOUT>
bool token_reduce_step(at::Tensor& out, const at::Tensor& matrix, const at::Tensor& right, double alpha,
                       const int64_t* dropout_seed = nullptr, uint32_t threshold = 0, KeepBytesOut keep_out = {}) {
  if (matrix.size(0) == 0) {
    out.zero_();
    return true;  // no rows: no bytes to write
  }
  if constexpr (!std::is_same_v<TM, float>) {
    const int64_t rank = right.size(1);
    if (!DROPOUT && token_reduce_on_cublas(rank, matrix.size(0))) {
      // R rounded to M's type, as our kernels do when staging it (PEFT's bf16 LoRA rounds it too).
      const at::Tensor right_rounded = right.to(matrix.scalar_type());
      if (out.stride(0) == 1 && out.t().is_contiguous() && out.scalar_type() != at::kFloat) {
        // out is the transposed view of a contiguous (r × C) tensor (dA): the product computed as (r × C), so that
        // the rounding copy runs along memory instead of transposing (an uncoalesced copy cost 4–5 µs at r = 64).
        at::Tensor result_t = at::empty({out.size(1), out.size(0)}, out.options().dtype(at::kFloat));
        mm_float_out(result_t, right_rounded.t(), matrix, alpha);
        out.t().copy_(result_t);
        return false;
      }
      into_float_contiguous(out, [&](at::Tensor& result) { mm_float_out(result, matrix.t(), right_rounded, alpha); });
      return false;
    }
    // Any rank: r % 8 != 0 is read with zeros past r (lora_token_reduce_wmma.cuh), not copied padded.
    if (rank <= kWmmaMaxRank) {
      if (token_reduce_wmma_supported(matrix, right)) {
        launch_token_reduce_wmma<TM, DROPOUT>(out, matrix, right, alpha, dropout_seed, threshold, keep_out);
        return true;
      }
    } else {
      // Ranks in chunks of at most 64 (one pass over M each), each a contiguous copy of R's columns.
      std::vector<at::Tensor> chunks;
      bool supported = true;
      for (int64_t j0 = 0; j0 < rank && supported; j0 += kWmmaMaxRank) {
        chunks.push_back(right.narrow(1, j0, std::min(kWmmaMaxRank, rank - j0)).contiguous());
        supported = token_reduce_wmma_supported(matrix, chunks.back());
      }
      if (supported) {
        for (size_t i = 0; i < chunks.size(); ++i) {
          const int64_t j0 = static_cast<int64_t>(i) * kWmmaMaxRank;
          at::Tensor part = out.narrow(1, j0, chunks[i].size(1));  // launch_token_reduce_wmma writes into it
          // Each chunk draws the same mask: the first writes its bytes.
          launch_token_reduce_wmma<TM, DROPOUT>(part, matrix, chunks[i], alpha, dropout_seed, threshold,
                                                i == 0 ? keep_out : KeepBytesOut{});
        }
        return true;
      }
    }
  }
  into_float_contiguous(out, [&](at::Tensor& result) {
    token_reduce<TM, DROPOUT>(result, matrix, right, alpha, dropout_seed, threshold);
  });
  return false;
}

}  // namespace cuda
}  // namespace lora_ext
