// Programmatic dependent launch (sm_90): a kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization may
// be scheduled before the kernel ahead of it in the stream has finished, and must call wait_for_preceding_kernel()
// (async_copy.cuh) before it touches global memory. The decoding kernels overlap their start with the base GEMM's end
// this way (multi_lora.cu); in large single-adapter calls the chain of our own kernels (shrink → fused GEMM; dy pass →
// finalize → dA reduction → finalize → fused dx GEMM) hides each boundary's launch latency, ≈ 1–2 µs each
// (docs/perf-notes.md v20).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "cluster_launch.h"

namespace lora_ext {
namespace cuda {

// LORA_EXT_PDL=0 launches every kernel as an ordinary stream successor (benchmarks compare both in one process).
inline bool dependent_launch_enabled() {
  const char* setting = std::getenv("LORA_EXT_PDL");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

// Whether the running operator asked for dependent launches (DependentLaunchScope): it knows the whole call's size,
// the kernels it launches do not. Off outside such a scope.
inline bool& dependent_launch_wanted() {
  thread_local bool wanted = false;
  return wanted;
}

// Dependent launches pay where the GPU, not the host, bounds the call: on an H100 the attribute costs each launch
// ≈ 6 µs of host time (a 2048-token training step at 4096²: 310 → 343 µs to enqueue) and saves ≈ 1–2 µs of GPU time
// per kernel boundary (8192 tokens: the step's gaps 7.4 µs → none). tokens · in · out ≥ 2^36 (4096³) is where the
// step's two base GEMMs alone outlast its host time there (docs/perf-notes.md v20).
inline bool dependent_launch_pays(int64_t tokens, int64_t in_features, int64_t out_features) {
  return static_cast<double>(tokens) * static_cast<double>(in_features) * static_cast<double>(out_features) >=
         68719476736.0;
}

// Sets dependent_launch_wanted() for the operator's extent (restored after, so nested calls keep their caller's).
class DependentLaunchScope {
 public:
  explicit DependentLaunchScope(bool wanted) : previous_(dependent_launch_wanted()) {
    dependent_launch_wanted() = wanted;
  }
  ~DependentLaunchScope() { dependent_launch_wanted() = previous_; }
  DependentLaunchScope(const DependentLaunchScope&) = delete;
  DependentLaunchScope& operator=(const DependentLaunchScope&) = delete;

 private:
  bool previous_;
};

// Whether `kernel` may be launched as a dependent on the current device: an sm_90+ GPU, and the loaded image of this
// kernel is sm_90+ code, whose wait_for_preceding_kernel() is real (a PTX image of an older architecture, JIT-compiled
// here, would compile it away and race its predecessor). Decided once per kernel and device. It cannot see whether the
// kernel calls the wait at all: every kernel launched through launch_dependent must, before any global access.
inline bool dependent_launch_supported(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> decided;
  const auto key = std::make_pair(kernel, static_cast<int>(c10::cuda::current_device()));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto known = decided.find(key);
  if (known != decided.end()) return known->second;
  bool supported = false;
  if (at::cuda::getCurrentDeviceProperties()->major >= 9) {
    const cudaError_t pending = cudaPeekAtLastError();  // not ours to clear
    cudaFuncAttributes attributes{};
    supported = cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess && attributes.ptxVersion >= 90;
    if (pending == cudaSuccess) (void)cudaGetLastError();  // a refused query is an answer (launch as usual)
  }
  decided.emplace(key, supported);
  return supported;
}

// kernel<<<grid, block, shared_bytes, current stream>>>(args...), as the programmatic dependent of the kernel ahead
// of it where the operator wants it and dependent_launch_supported; the kernel calls wait_for_preceding_kernel()
// before any global access (a no-op when launched plainly).
template <typename... KernelArgs, typename... Args>
void launch_dependent(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attribute = programmatic_stream_serialization();
  if (dependent_launch_wanted() && dependent_launch_enabled() &&
      dependent_launch_supported(reinterpret_cast<const void*>(kernel))) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace cuda
}  // namespace lora_ext
