// The LoRA dropout mask as a pure function of (seed, row, column).
//
// Forward and backward both call dropout_keep() for the elements they touch, so the mask is never
// stored: backward regenerates exactly the forward's mask from the same 64-bit seed. The seed is an
// int64 tensor drawn from torch's own generator (lora_ext.ops.new_dropout_seed), which keeps
// torch.manual_seed reproducibility and, on CUDA, stays correct under CUDA-graph capture because
// the kernels read the seed from device memory at run time.
//
// The bits come from Philox4x32-10 (Salmon et al. 2011; the generator behind at::Philox4_32 and
// curand), keyed by the seed, with the counter (column / 8, row): one call yields the four
// words that decide eight adjacent columns. The same function runs on the host and on the device, so the CPU
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
#ifdef __CUDA_ARCH__  // device code only: g++ ignores (and -Wall flags) the pragma in the host pass
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

// Each 32-bit Philox word decides two elements by its 16-bit halves, so one call covers eight adjacent
// columns: a half is kept when it is >= threshold = floor(p · 2^16). The kept fraction is then exactly
// 1 − threshold / 2^16 (p rounded down to a multiple of 2^-16, at most 1.5e-5 below it), and kept
// elements are scaled by keep_scale(p) = 2^16 / (2^16 − threshold), its exact inverse, so dropout stays
// unbiased.
inline uint32_t dropout_threshold(double dropout_p) {
  const double scaled = std::floor(dropout_p * 65536.0);
  return scaled >= 65535.0 ? 65535u : static_cast<uint32_t>(scaled < 0 ? 0 : scaled);
}

inline double dropout_keep_scale(double dropout_p) {
  return dropout_p > 0.0 ? 65536.0 / (65536.0 - static_cast<double>(dropout_threshold(dropout_p))) : 1.0;
}

// Keep bits of the eight columns 8·column_group … 8·column_group + 7 of a row (bit e: column 8·group + e).
C10_HOST_DEVICE inline unsigned dropout_keep8(uint64_t seed, uint64_t row, uint64_t column_group, uint32_t threshold) {
  const PhiloxWords words = philox4x32_10(static_cast<uint32_t>(column_group), static_cast<uint32_t>(column_group >> 32),
                                          static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  unsigned keep = 0;
#ifdef __CUDA_ARCH__  // device code only: g++ ignores (and -Wall flags) the pragma in the host pass
#pragma unroll
#endif
  for (int w = 0; w < 4; ++w) {
    keep |= ((words.w[w] & 0xffffu) >= threshold ? 1u : 0u) << (2 * w);
    keep |= ((words.w[w] >> 16) >= threshold ? 1u : 0u) << (2 * w + 1);
  }
  return keep;
}

// dropout_keep8 for the eight column groups first_group … first_group + 7 of a row (64 columns), on the host:
// the same Philox rounds written lane by lane over the groups, so that the compiler turns them into vector
// instructions (one scalar call per group made the CPU mask about a third of a training step with dropout).
inline void dropout_keep8_x8(uint64_t seed, uint64_t row, uint64_t first_group, uint32_t threshold,
                             unsigned (&keep)[8]) {
  constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
  constexpr uint32_t kWeylA = 0x9E3779B9u, kWeylB = 0xBB67AE85u;
  uint32_t c0[8], c1[8], c2[8], c3[8];
  for (int lane = 0; lane < 8; ++lane) {
    const uint64_t group = first_group + static_cast<uint64_t>(lane);
    c0[lane] = static_cast<uint32_t>(group);
    c1[lane] = static_cast<uint32_t>(group >> 32);
    c2[lane] = static_cast<uint32_t>(row);
    c3[lane] = static_cast<uint32_t>(row >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int lane = 0; lane < 8; ++lane) {
      const uint64_t product0 = static_cast<uint64_t>(kMulA) * c0[lane];
      const uint64_t product1 = static_cast<uint64_t>(kMulB) * c2[lane];
      c0[lane] = static_cast<uint32_t>(product1 >> 32) ^ c1[lane] ^ k0;
      c1[lane] = static_cast<uint32_t>(product1);
      c2[lane] = static_cast<uint32_t>(product0 >> 32) ^ c3[lane] ^ k1;
      c3[lane] = static_cast<uint32_t>(product0);
    }
    k0 += kWeylA;
    k1 += kWeylB;
  }
  for (int lane = 0; lane < 8; ++lane) {
    const uint32_t words[4] = {c0[lane], c1[lane], c2[lane], c3[lane]};
    unsigned bits = 0;
    for (int w = 0; w < 4; ++w) {
      bits |= ((words[w] & 0xffffu) >= threshold ? 1u : 0u) << (2 * w);
      bits |= ((words[w] >> 16) >= threshold ? 1u : 0u) << (2 * w + 1);
    }
    keep[lane] = bits;
  }
}

C10_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t row, uint64_t column, uint32_t threshold) {
  return (dropout_keep8(seed, row, column >> 3, threshold) >> (column & 7)) & 1u;
}

}  // namespace lora_ext
