// The LoRA dropout mask as a pure function of (seed, row, column).
//
// Forward and backward both call dropout_keep() for the elements they touch, so the mask is never
// stored: backward regenerates exactly the forward's mask from the same 64-bit seed. The seed is an
// int64 tensor drawn from torch's own generator (lora_ext.ops.new_dropout_seed), which keeps
// torch.manual_seed reproducibility and, on CUDA, stays correct under CUDA-graph capture because
// the kernels read the seed from device memory at run time.
//
// The bits come from Philox4x32-10 (Salmon et al. 2011; the generator behind at::Philox4_32 and
// curand), keyed by the seed, with the counter (column / 4, row): one call yields the four
// words for four adjacent columns. The same function runs on the host and on the device, so the CPU
// and CUDA kernels draw identical masks for the same seed.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace lora_ext {

struct PhiloxWords {
  uint32_t w[4];
};

C10_HOST_DEVICE inline uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

C10_HOST_DEVICE inline PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
  constexpr uint32_t kWeylA = 0x9E3779B9u, kWeylB = 0xBB67AE85u;
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi_u32(kMulA, c0), lo0 = kMulA * c0;
    const uint32_t hi1 = mul_hi_u32(kMulB, c2), lo1 = kMulB * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeylA;
    k1 += kWeylB;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// An element is kept when its 32-bit word is >= threshold; threshold = p * 2^32, so P(keep) = 1 - p
// to within 2^-32.
inline uint32_t dropout_threshold(double dropout_p) {
  const double scaled = std::floor(dropout_p * 4294967296.0);
  return scaled >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(scaled < 0 ? 0 : scaled);
}

C10_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t row, uint64_t column, uint32_t threshold) {
  const PhiloxWords words = philox4x32_10(static_cast<uint32_t>(column >> 2), static_cast<uint32_t>(column >> 34),
                                          static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint32_t lane = static_cast<uint32_t>(column & 3);
  // Select without a run-time index into the array, so the words stay in registers on the GPU.
  const uint32_t word = lane == 0 ? words.w[0] : lane == 1 ? words.w[1] : lane == 2 ? words.w[2] : words.w[3];
  return word >= threshold;
}

// Keep bits of the four adjacent columns 4·column_group … 4·column_group + 3 of a row (bit e for
// column 4·column_group + e): one Philox call, the same bits dropout_keep() gives one at a time.
C10_HOST_DEVICE inline unsigned dropout_keep4(uint64_t seed, uint64_t row, uint64_t column_group, uint32_t threshold) {
  const PhiloxWords words = philox4x32_10(static_cast<uint32_t>(column_group), static_cast<uint32_t>(column_group >> 32),
                                          static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (words.w[0] >= threshold ? 1u : 0u) | (words.w[1] >= threshold ? 2u : 0u) |
         (words.w[2] >= threshold ? 4u : 0u) | (words.w[3] >= threshold ? 8u : 0u);
}

}  // namespace lora_ext
