// Warp-level tensor-core pieces for kernels that stage their operands themselves (lora_dy_pass.cuh,
// lora_decode_gemv.cuh):
// ldmatrix loads of four 8 × 8 matrices of 16-bit elements, plain or transposed, and the m16n8k16 MMA with float32
// accumulators, in the fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16"). sm_80+: callers guard
// their use with __CUDA_ARCH__. The functions are declared in every compilation pass: the host pass parses device
// templates that name them, and under C++17 an undeclared `name<T>(...)` is a syntax error (torch 2.11 builds with
// -std=c++17). Below sm_80 their bodies trap.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace lora_ext {
namespace cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LORA_EXT_HAS_MMA_SYNC 1
#endif

__device__ __forceinline__ void load_matrices_x4(uint32_t (&r)[4], const void* row_address) {
#ifdef LORA_EXT_HAS_MMA_SYNC
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(row_address))));
#else
  __trap();
#endif
}
__device__ __forceinline__ void load_matrices_x4_transposed(uint32_t (&r)[4], const void* row_address) {
#ifdef LORA_EXT_HAS_MMA_SYNC
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(row_address))));
#else
  __trap();
#endif
}

// acc (16 × 8, float32) += a (16 × 16) · b (16 × 8), 16-bit operands in mma.sync's fragment layouts.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef LORA_EXT_HAS_MMA_SYNC
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

}  // namespace cuda
}  // namespace lora_ext
