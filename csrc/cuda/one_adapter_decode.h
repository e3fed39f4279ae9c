// Single-adapter decoding on the multi-adapter decoding cluster kernel (multi_lora_cluster.cuh), every token on one
// slot. lora_forward (forward.cu) takes it for a few tokens without dropout: that kernel stages its operands with
// cp.async, shrinks on tensor cores and sums its blocks' partials by st.async, which lora_decode.cuh's kernel does
// not (docs/perf-notes.md v19: 1.34–1.89× the base layer at 17–64 tokens in a CUDA graph before, 1.24–1.37× on this
// kernel).
#pragma once

#include <ATen/ATen.h>

namespace lora_ext {
namespace cuda {

// y += scaling · (x·Aᵀ)·Bᵀ and lora_activation = x·Aᵀ (float32, tokens × rank) in one clustered launch, made as the
// programmatic dependent of the kernel just launched (the base GEMM that wrote y: the caller launches nothing in
// between). Returns false, launching nothing, where the shapes, strides, alignment, the GPU or the build do not
// allow it, or LORA_EXT_DECODE_CLUSTER=0 (benchmarks compare both paths in one process).
bool launch_one_adapter_decode(at::Tensor& y, at::Tensor& lora_activation, const at::Tensor& x,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling);

}  // namespace cuda
}  // namespace lora_ext
