// Host-side launchers for lora_gemm_kernel: pick a tile for the output's width, split K across
// blocks when the output tiles alone cannot fill the GPU (the reductions over tokens, and decoding),
// and sum the float32 partials in a fixed order, so results are bit-for-bit repeatable.
#pragma once

#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <limits>

#include "lora_gemm.cuh"

namespace lora_ext {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The operands of C = alpha · A·B, each as a tensor plus the element strides of its two logical dims.
inline GemmParams gemm_params(const at::Tensor& a, int64_t a_stride_m, int64_t a_stride_k, const at::Tensor& b,
                              int64_t b_stride_k, int64_t b_stride_n, int64_t m, int64_t n, int64_t k, double alpha) {
  GemmParams p{};
  p.a = a.data_ptr();
  p.a_stride_m = a_stride_m;
  p.a_stride_k = a_stride_k;
  p.b = b.data_ptr();
  p.b_stride_k = b_stride_k;
  p.b_stride_n = b_stride_n;
  p.m = m;
  p.n = n;
  p.k = k;
  p.k_per_split = k;
  p.alpha = static_cast<float>(alpha);
  return p;
}

inline void set_dropout(GemmParams& p, const int64_t* dropout_seed, uint32_t threshold, int64_t row_offset) {
  p.dropout_seed = dropout_seed;
  p.dropout_threshold = threshold;
  p.dropout_row_offset = row_offset;
}

template <int BM, int BN, int TM, int TN, typename TA, typename TB, typename TC, DropoutAt DROPOUT>
void launch_tile(const GemmParams& p, int64_t splits) {
  const int64_t tiles_m = ceil_div(p.m, BM), tiles_n = ceil_div(p.n, BN);
  LORA_CHECK(tiles_n <= 65535 && splits <= 65535, "lora_ext: matrix too wide for the launch grid (", p.n,
              " columns)");
  LORA_CHECK(tiles_m <= std::numeric_limits<int32_t>::max(), "lora_ext: too many rows (", p.m, ")");
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n), static_cast<unsigned>(splits));
  lora_gemm_kernel<BM, BN, TM, TN, TA, TB, TC, DROPOUT>
      <<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out (float32, M × N, contiguous) = alpha · A·B.
template <int BM, int BN, int TM, int TN, typename TA, typename TB, DropoutAt DROPOUT>
void gemm_store_float_tiled(GemmParams p, at::Tensor& out) {
  constexpr int64_t BK = 16;
  const int64_t tiles = ceil_div(p.m, BM) * ceil_div(p.n, BN);
  const int64_t k_tiles = ceil_div(p.k, BK);
  const int64_t wanted_blocks = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = 1;
  if (tiles < wanted_blocks) {
    // Keep at least four K tiles per split, so a block's loads amortise its launch and reduction.
    splits = std::max<int64_t>(1, std::min(ceil_div(wanted_blocks, tiles), k_tiles / 4));
  }
  p.k_per_split = ceil_div(k_tiles, splits) * BK;
  splits = ceil_div(p.k, p.k_per_split);
  if (splits <= 1) {
    p.c = out.data_ptr<float>();
    p.c_stride_m = p.n;
    p.c_stride_n = 1;
    p.c_stride_split = 0;
    launch_tile<BM, BN, TM, TN, TA, TB, float, DROPOUT>(p, 1);
    return;
  }
  at::Tensor partials = at::empty({splits, p.m, p.n}, out.options());
  p.c = partials.data_ptr<float>();
  p.c_stride_m = p.n;
  p.c_stride_n = 1;
  p.c_stride_split = p.m * p.n;
  launch_tile<BM, BN, TM, TN, TA, TB, float, DROPOUT>(p, splits);
  at::sum_out(out, partials, {0});
}

template <typename TA, typename TB, DropoutAt DROPOUT>
void gemm_store_float(const GemmParams& p, at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.scalar_type() == at::kFloat);
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {
    out.zero_();
    return;
  }
  if (p.n <= 16) {
    gemm_store_float_tiled<128, 16, 8, 1, TA, TB, DROPOUT>(p, out);
  } else if (p.n <= 32) {
    gemm_store_float_tiled<64, 32, 4, 2, TA, TB, DROPOUT>(p, out);
  } else {
    gemm_store_float_tiled<64, 64, 4, 4, TA, TB, DROPOUT>(p, out);
  }
}

// Calls fn(activation_tag, adapter_tag) with value-initialised tags of the C++ types for the
// activation dtype (x, W) and the adapter dtype (lora_A, lora_B): the same dtype, or float32.
template <typename Fn>
void dispatch_activation_and_adapter(at::ScalarType activation, at::ScalarType adapter, const char* op, Fn&& fn) {
  const bool float_adapter = adapter == at::kFloat;
  switch (activation) {
    case at::kFloat:
      fn(float{}, float{});
      return;
    case at::kHalf:
      if (float_adapter) fn(at::Half{}, float{}); else fn(at::Half{}, at::Half{});
      return;
    case at::kBFloat16:
      if (float_adapter) fn(at::BFloat16{}, float{}); else fn(at::BFloat16{}, at::BFloat16{});
      return;
    default:
      LORA_CHECK(false, op, ": unsupported dtype ", activation, " on CUDA");
  }
}

}  // namespace cuda
}  // namespace lora_ext
