// The dropout mask of a (tokens × columns) input, written once as bytes for a kernel that would otherwise redraw it:
// byte g of row t is dropout_keep8(seed, t, g) (bit e keeps column 8g + e), rows `pitch` bytes apart. The backward's
// fused dx GEMM reads it (lora_gemm_sm90.h): there the Philox rounds would run in the consumers' MMA loop, which
// measured 43 µs slower at 8192 × 4096 (docs/perf-notes.md v13). The dA token reduction draws the same mask and writes
// these bytes as it goes (lora_token_reduce_wmma.cuh); this kernel serves where that reduction does not run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../dropout_mask.h"

namespace lora_ext {
namespace cuda {

// Where a kernel drawing the mask also writes its keep bytes; bytes == nullptr: nowhere.
struct KeepBytesOut {
  uint8_t* bytes = nullptr;
  int64_t pitch = 0;
};

// (tokens × pitch) bytes, pitch ⌈columns / 8⌉ rounded up to 32: a 256-column tile's bytes are two whole 16-byte loads.
inline at::Tensor new_keep_bytes(int64_t tokens, int64_t columns, const at::TensorOptions& options) {
  const int64_t pitch = ((columns + 7) / 8 + 31) / 32 * 32;
  return at::empty({tokens, pitch}, options.dtype(at::kByte));
}

inline KeepBytesOut keep_bytes_out(at::Tensor& keep_bytes) {
  return keep_bytes.defined() ? KeepBytesOut{keep_bytes.data_ptr<uint8_t>(), keep_bytes.size(1)} : KeepBytesOut{};
}

// A template, so that each .cu including this header may carry it (as the other kernels in headers are).
template <typename Byte>
__global__ void dropout_keep_bytes_kernel(const int64_t* __restrict__ seed_ptr, uint32_t threshold, int64_t tokens,
                                          int64_t groups, Byte* __restrict__ out, int64_t pitch) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  for (int64_t t = blockIdx.y; t < tokens; t += gridDim.y) {
    out[t * pitch + g] = static_cast<Byte>(dropout_keep8(seed, static_cast<uint64_t>(t), static_cast<uint64_t>(g),
                                                            threshold));
  }
}

// Fills keep_bytes (new_keep_bytes' layout) with the mask of a (keep_bytes.size(0) × columns) input.
inline void launch_dropout_keep_bytes(at::Tensor& keep_bytes, int64_t columns, const int64_t* seed, uint32_t threshold) {
  const int64_t tokens = keep_bytes.size(0), groups = (columns + 7) / 8;
  if (tokens == 0 || groups == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>((groups + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(tokens, 65535)));
  dropout_keep_bytes_kernel<uint8_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      seed, threshold, tokens, groups, keep_bytes.data_ptr<uint8_t>(), keep_bytes.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lora_ext
