// cp.async: 16 bytes from global to shared memory without a trip through registers (sm_80+), shared by the exact
// merge (merge_exact.cu) and the one-launch decoding kernel (lora_decode_gemv.cuh); and the wait of a
// programmatically dependent launch, for the multi-adapter decoding kernel (multi_lora_gather.cuh).
#pragma once

#include <cuda_runtime.h>

namespace lora_ext {
namespace cuda {

// Copies src_bytes (16, or 0 to write 16 zero bytes and read nothing) from a 16-byte aligned global address. Before
// sm_80: an ordinary load and store.
__device__ __forceinline__ void copy_16_bytes_async(void* shared, const void* global, int src_bytes = 16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(src_bytes)
               : "memory");
#else
  *static_cast<uint4*>(shared) = src_bytes == 0 ? make_uint4(0, 0, 0, 0) : __ldcs(static_cast<const uint4*>(global));
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits for all of this thread's copies (other threads' copies need a barrier after this).
__device__ __forceinline__ void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
// Waits for this thread's committed groups of copies but the kPending most recent ones.
template <int kPending>
__device__ __forceinline__ void copy_async_wait_pending() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Programmatic dependent launch (sm_90+). A kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization
// may start before the kernel ahead of it in the stream has finished (once that kernel's blocks have all exited or
// signalled); this waits until that kernel has completed and its writes are visible. Anything the kernel ahead may
// write must be read after it. Without the attribute it returns at once.
__device__ __forceinline__ void wait_for_preceding_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace cuda
}  // namespace lora_ext
