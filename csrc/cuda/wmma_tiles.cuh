// Shared pieces of the tensor-core kernels (lora_shrink.cuh, lora_expand_wmma.cuh,
// lora_token_reduce_wmma.cuh): the WMMA element types, and loads of eight consecutive elements as one
// 16-byte vector of the MMA type, converting float32 (adapters or x·Aᵀ) to 16 bits on the way.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "../dropout_mask.h"

namespace lora_ext {
namespace cuda {

// The WMMA element type of T, and whether this compilation target has its fragments: bfloat16 WMMA exists from sm_80
// on. Below it (a build for a T4 or a V100 too) the bfloat16 kernels compile against half fragments as a stand-in
// and trap if ever launched; the host never launches them there (wmma_dtype_usable).
template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
  static constexpr bool kCompiled = true;
};
template <>
struct WmmaType<at::BFloat16> {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  using type = __half;
  static constexpr bool kCompiled = false;
#else
  using type = __nv_bfloat16;
  static constexpr bool kCompiled = true;
#endif
};

// Whether the tensor-core kernels may run for x of this dtype on the current GPU (bfloat16 needs sm_80).
inline bool wmma_dtype_usable(at::ScalarType dtype) {
  if (dtype == at::kHalf) return true;
  return dtype == at::kBFloat16 && at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// Eight elements of T packed in 16 bytes.
template <typename T>
union Pack8 {
  uint4 bits;
  T v[8];
};

// Eight consecutive elements at `src` (16-byte aligned for 16-bit sources, 16-byte aligned for float),
// as T. Float sources are rounded to T once.
template <typename T, typename TSrc>
__device__ __forceinline__ uint4 load8_as(const TSrc* src) {
  if constexpr (std::is_same_v<TSrc, T>) {
    return *reinterpret_cast<const uint4*>(src);
  } else {
    static_assert(std::is_same_v<TSrc, float>, "sources are T or float");
    const float4 lo = *reinterpret_cast<const float4*>(src);
    const float4 hi = *reinterpret_cast<const float4*>(src + 4);
    Pack8<T> out;
    out.v[0] = T(lo.x);
    out.v[1] = T(lo.y);
    out.v[2] = T(lo.z);
    out.v[3] = T(lo.w);
    out.v[4] = T(hi.x);
    out.v[5] = T(hi.y);
    out.v[6] = T(hi.z);
    out.v[7] = T(hi.w);
    return out.bits;
  }
}

// The first `count` of eight consecutive elements at `src` as T, zeros after them, by element loads (any
// alignment): the rows of a rank-contiguous operand with r % 8 != 0, which start on no 16-byte boundary. The zero
// ranks add exact zeros to the MMAs, so no zero-padded copy of the operand is needed.
template <typename T, typename TSrc>
__device__ __forceinline__ uint4 load8_as_partial(const TSrc* src, int count) {
  Pack8<T> out;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    if constexpr (std::is_same_v<TSrc, T>) {
      out.v[q] = q < count ? src[q] : T(0.f);
    } else {
      out.v[q] = T(q < count ? src[q] : 0.f);
    }
  }
  return out.bits;
}

// Eight ranks j … j+7 of a rank-contiguous row as T: one 16-byte load where the rows allow it (r % 8 == 0, rows
// and base 16-byte aligned: `vector_rows`), element loads with zeros past the rank otherwise.
template <typename T, typename TSrc>
__device__ __forceinline__ uint4 load8_ranks_as(const TSrc* row, int64_t j, int64_t rank, bool vector_rows) {
  if (vector_rows) return load8_as<T>(row + j);
  return load8_as_partial<T>(row + j, static_cast<int>(rank - j < 8 ? rank - j : 8));
}

// Eight consecutive elements at a 16-byte aligned address, as float32: one 16-byte load for 16-bit types, two for
// float32 (shared by the decode, gather and one-launch kernels).
template <typename T>
__device__ __forceinline__ void load8_float(const T* src, float (&out)[8]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 lo = *reinterpret_cast<const float4*>(src);
    const float4 hi = *reinterpret_cast<const float4*>(src + 4);
    out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
    out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
  } else {
    Pack8<T> pack;
    pack.bits = *reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int q = 0; q < 8; ++q) out[q] = static_cast<float>(pack.v[q]);
  }
}

// Zero the elements of an 8-vector whose keep bit (bit q: element q) is clear.
template <typename T>
__device__ __forceinline__ uint4 apply_keep8(uint4 bits, unsigned keep) {
  Pack8<T> pack;
  pack.bits = bits;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    if (!((keep >> q) & 1u)) pack.v[q] = T(0.f);
  }
  return pack.bits;
}

// Zero the elements of an 8-vector (columns col … col+7 of `row`, col % 8 == 0) that dropout drops.
template <typename T>
__device__ __forceinline__ uint4 apply_dropout8(uint4 bits, uint64_t seed, int64_t row, int64_t col,
                                                uint32_t threshold) {
  return apply_keep8<T>(bits, dropout_keep8(seed, row, col >> 3, threshold));
}

// apply_dropout8 with the Philox words applied as AND masks on the packed pairs (dropout_keep8's bit 2w, element 2w,
// is the low half of word w; bit 2w + 1 the high half), without assembling and taking apart the keep byte: fewer
// instructions per element where registers are not what limits the kernel (the Hopper shrink, lora_shrink_sm90.cu).
// group = col / 8; any 16-bit element type.
__device__ __forceinline__ uint4 apply_dropout8_as_masks(uint4 bits, uint64_t seed, uint64_t row, uint64_t group,
                                                         uint32_t threshold) {
  const PhiloxWords words = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                                          static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  auto mask = [threshold](uint32_t word) {
    return ((word & 0xffffu) >= threshold ? 0x0000ffffu : 0u) | ((word >> 16) >= threshold ? 0xffff0000u : 0u);
  };
  return make_uint4(bits.x & mask(words.w[0]), bits.y & mask(words.w[1]), bits.z & mask(words.w[2]),
                    bits.w & mask(words.w[3]));
}

// apply_dropout8_as_masks that also returns the keep byte (dropout_keep8's bits, from the same Philox words), for a
// kernel that writes the mask's keep bytes for another to read (the Hopper token reduction, lora_token_reduce_sm90.cu).
__device__ __forceinline__ uint4 apply_dropout8_as_masks_with_keep(uint4 bits, uint64_t seed, uint64_t row,
                                                                   uint64_t group, uint32_t threshold,
                                                                   unsigned& keep) {
  const PhiloxWords words = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                                          static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  uint32_t masks[4];
  keep = 0;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const bool low = (words.w[w] & 0xffffu) >= threshold, high = (words.w[w] >> 16) >= threshold;
    masks[w] = (low ? 0x0000ffffu : 0u) | (high ? 0xffff0000u : 0u);
    keep |= (low ? 1u : 0u) << (2 * w);
    keep |= (high ? 1u : 0u) << (2 * w + 1);
  }
  return make_uint4(bits.x & masks[0], bits.y & masks[1], bits.z & masks[2], bits.w & masks[3]);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether a rank-contiguous (rows × r) operand's rows can be read 8 ranks per 16-byte load.
inline bool rank_rows_vectorizable(const at::Tensor& t) {
  return t.size(1) % 8 == 0 && t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) % 8 == 0) && aligned16(t.data_ptr());
}

}  // namespace cuda
}  // namespace lora_ext
