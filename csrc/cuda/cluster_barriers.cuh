// sm_90 mbarriers and thread-block-cluster synchronisation as thin inline-PTX wrappers, shared by the fused GEMM
// (lora_gemm_sm90.cu, through sm90_primitives.cuh) and the multi-adapter decoding kernel (multi_lora_cluster.cuh).
// Bodies compile for sm_90 and later (plain sm_90 too: the decoding kernel is not sm_90a-only); below they are empty,
// and no launcher runs their kernels there.
#pragma once

#include <cstdint>

// st.async (below) is PTX ISA 8.1: a clear message instead of ptxas's where an sm_90 build meets CUDA 12.0.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ < 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 1))
#error "lora_ext: building for sm_90 needs CUDA 12.1 or newer (st.async is PTX ISA 8.1); set TORCH_CUDA_ARCH_LIST without 9.0 or update the toolkit"
#endif

namespace lora_ext {
namespace cuda {

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// --- mbarriers ------------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(barrier)), "r"(arrivals));
#endif
}

// Makes the initialised barriers visible to the copy engine and to the cluster's other blocks (with a cluster
// barrier after it) before any copy or remote store names them.
__device__ __forceinline__ void fence_barrier_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// One arrival that also announces `bytes` to come from bulk copies or st.async: the phase completes when both
// happened (the bytes may land before the announcement).
__device__ __forceinline__ void mbarrier_arrive_expect_bytes(uint64_t* barrier, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
#endif
}

// One test of the barrier's phase of the given parity (0 or 1): true once it has completed. Acquires at CTA scope
// (what this block's threads and the copy engine wrote), or with kCluster at cluster scope (data other blocks of
// the cluster stored with st.async, whose completion on the barrier is a cluster-scope release).
template <bool kCluster>
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t address, uint32_t parity) {
  uint32_t done = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kCluster) {
    asm volatile(
        "{\n"
        ".reg .pred complete;\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 complete, [%1], %2;\n"
        "selp.u32 %0, 1, 0, complete;\n"
        "}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
  } else {
    asm volatile(
        "{\n"
        ".reg .pred complete;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
        "selp.u32 %0, 1, 0, complete;\n"
        "}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
  }
#endif
  return done != 0;
}

// Waits until the barrier's phase of the given parity has completed (CTA-scope acquire).
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  const uint32_t address = shared_address(barrier);
  while (!mbarrier_try_wait<false>(address, parity)) {
  }
}

// The same, acquiring at cluster scope: for the peers' st.async stores.
__device__ __forceinline__ void mbarrier_wait_cluster(uint64_t* barrier, uint32_t parity) {
  const uint32_t address = shared_address(barrier);
  while (!mbarrier_try_wait<true>(address, parity)) {
  }
}

// --- the cluster barrier, split in two (arrive early, wait late) --------------------------------------------------
// Relaxed: orders nothing by itself; after fence_barrier_init it publishes the barriers' initialisation.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

// --- stores into another block's shared memory ------------------------------------------------------------------
// Four floats into `destination` (this block's address of a shared array) of cluster block `block_rank`, completing
// on that block's `barrier` (the same offset as this block's) with their 16 bytes. For peers only: the PTX text
// describes st.async into another block's shared memory. PTX ISA 8.1 (CUDA 12.1).
__device__ __forceinline__ void store_4_floats_async(const float* destination, uint64_t* barrier,
                                                     uint32_t block_rank, const float (&v)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .b32 remote_data, remote_barrier;\n"
      "mapa.shared::cluster.u32 remote_data, %0, %2;\n"
      "mapa.shared::cluster.u32 remote_barrier, %1, %2;\n"
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [remote_data], {%3, %4, %5, %6}, "
      "[remote_barrier];\n"
      "}\n" ::"r"(shared_address(destination)),
      "r"(shared_address(barrier)), "r"(block_rank), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
      : "memory");
#endif
}

}  // namespace cuda
}  // namespace lora_ext
