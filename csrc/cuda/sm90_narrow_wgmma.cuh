// Narrow warpgroup MMAs (sm_90a): d (64 × N float32) (+)= A (64 × 16) · B (N × 16)ᵀ for N = 16, 32 and 64, both
// operands in shared memory, addressed by descriptors (sm90_primitives.cuh). The rank-r products of the Hopper shrink
// (lora_shrink_sm90.cu) use them: N is the rank padded to 16, 32 or 64. B K-major at every N; N-major (a row-major
// (K × N) matrix as the copy engine writes it) at N = 64 only, the width of one 128-byte swizzle atom; at N = 64 also
// with A MN-major (the token reduction, lora_token_reduce_sm90.cu). Accumulator layout of m64nN: thread (warp w,
// lane l) of the warpgroup holds, for each 8-column block j, rows 16w + l/4 (+8) and columns 8j + 2(l%4) (+1) in
// d[4j .. 4j+3].
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "sm90_primitives.cuh"

namespace lora_ext {
namespace cuda {
namespace sm90 {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define LORA_EXT_DEFINE_WGMMA_M64N16K16(NAME, TYPE, TRANSPOSE_B) \
  __device__ __forceinline__ void NAME(float(&d)[8], uint64_t desc_a, uint64_t desc_b, int scale_d) { \
    asm volatile( \
        "{\n" \
        ".reg .pred p;\n" \
        "setp.ne.b32 p, %10, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n16k16.f32." #TYPE "." #TYPE " {%0, %1, %2, %3, %4, %5, %6, %7}, " \
        "%8, %9, p, 1, 1, 0, " #TRANSPOSE_B ";\n" \
        "}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d)); \
  }
LORA_EXT_DEFINE_WGMMA_M64N16K16(wgmma_m64n16k16_bf16, bf16, 0)
LORA_EXT_DEFINE_WGMMA_M64N16K16(wgmma_m64n16k16_f16, f16, 0)
#undef LORA_EXT_DEFINE_WGMMA_M64N16K16

#define LORA_EXT_DEFINE_WGMMA_M64N32K16(NAME, TYPE, TRANSPOSE_B) \
  __device__ __forceinline__ void NAME(float(&d)[16], uint64_t desc_a, uint64_t desc_b, int scale_d) { \
    asm volatile( \
        "{\n" \
        ".reg .pred p;\n" \
        "setp.ne.b32 p, %18, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." #TYPE "." #TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, " \
        "%16, %17, p, 1, 1, 0, " #TRANSPOSE_B ";\n" \
        "}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d)); \
  }
LORA_EXT_DEFINE_WGMMA_M64N32K16(wgmma_m64n32k16_bf16, bf16, 0)
LORA_EXT_DEFINE_WGMMA_M64N32K16(wgmma_m64n32k16_f16, f16, 0)
#undef LORA_EXT_DEFINE_WGMMA_M64N32K16

#define LORA_EXT_DEFINE_WGMMA_M64N64K16(NAME, TYPE, TRANSPOSE_A, TRANSPOSE_B) \
  __device__ __forceinline__ void NAME(float(&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) { \
    asm volatile( \
        "{\n" \
        ".reg .pred p;\n" \
        "setp.ne.b32 p, %34, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." #TYPE "." #TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
        "%32, %33, p, 1, 1, " #TRANSPOSE_A ", " #TRANSPOSE_B ";\n" \
        "}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d)); \
  }
LORA_EXT_DEFINE_WGMMA_M64N64K16(wgmma_m64n64k16_bf16, bf16, 0, 0)
LORA_EXT_DEFINE_WGMMA_M64N64K16(wgmma_m64n64k16_bf16_n_major_b, bf16, 0, 1)
LORA_EXT_DEFINE_WGMMA_M64N64K16(wgmma_m64n64k16_f16, f16, 0, 0)
LORA_EXT_DEFINE_WGMMA_M64N64K16(wgmma_m64n64k16_f16_n_major_b, f16, 0, 1)
// Both operands MN-major (A: a row-major (K × M) tile, M = 64 along its 128-byte rows; B N-major as above): the
// token reduction Xᵀ·G reads X's (tokens × 64 columns) tile as A and G's (tokens × 64 ranks) tile as B, as they lie.
LORA_EXT_DEFINE_WGMMA_M64N64K16(wgmma_m64n64k16_bf16_mn_major_a_n_major_b, bf16, 1, 1)
LORA_EXT_DEFINE_WGMMA_M64N64K16(wgmma_m64n64k16_f16_mn_major_a_n_major_b, f16, 1, 1)
#undef LORA_EXT_DEFINE_WGMMA_M64N64K16

// d (+)= A·Bᵀ for one 16-deep K step, by operand type T (at::BFloat16 or at::Half), width N and B's layout.
template <typename T, int N, bool kNMajorB>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  static_assert(!kNMajorB || N == 64, "an N-major B operand needs N = 64 (one swizzle atom wide)");
  if constexpr (N == 16) {
    if constexpr (kBf16) wgmma_m64n16k16_bf16(d, desc_a, desc_b, scale_d);
    else wgmma_m64n16k16_f16(d, desc_a, desc_b, scale_d);
  } else if constexpr (N == 32) {
    if constexpr (kBf16) wgmma_m64n32k16_bf16(d, desc_a, desc_b, scale_d);
    else wgmma_m64n32k16_f16(d, desc_a, desc_b, scale_d);
  } else if constexpr (kNMajorB) {
    if constexpr (kBf16) wgmma_m64n64k16_bf16_n_major_b(d, desc_a, desc_b, scale_d);
    else wgmma_m64n64k16_f16_n_major_b(d, desc_a, desc_b, scale_d);
  } else {
    if constexpr (kBf16) wgmma_m64n64k16_bf16(d, desc_a, desc_b, scale_d);
    else wgmma_m64n64k16_f16(d, desc_a, desc_b, scale_d);
  }
}

// d (64 × 64) (+)= A·B for one 16-deep K step, A (K × 64) and B (K × 64) both MN-major (see above), by type T.
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_mn_major(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                         int scale_d) {
  if constexpr (std::is_same_v<T, at::BFloat16>) wgmma_m64n64k16_bf16_mn_major_a_n_major_b(d, desc_a, desc_b, scale_d);
  else wgmma_m64n64k16_f16_mn_major_a_n_major_b(d, desc_a, desc_b, scale_d);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace sm90
}  // namespace cuda
}  // namespace lora_ext
