// RoundedCopy: the optional second output of the kernels that produce a rank-r operand of the fused Hopper GEMMs.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace lora_ext {
namespace cuda {

// An optional second output of a kernel whose first output is float32 (tokens × r): the same values times `scale`,
// rounded once to the 16-bit activation dtype, rows `pitch` elements apart. The fused Hopper GEMMs take the rank-r
// operand in that form (lora_gemm_operand), so the kernel that produces the values writes it too, instead of a
// separate multiply-and-round kernel (2.8 µs and a launch each, forward and backward; docs/perf-notes.md v15).
struct RoundedCopy {
  void* out = nullptr;  // nullptr: none
  int64_t pitch = 0;
  float scale = 1.f;
};

// LORA_EXT_ROUNDED_COPY=0: the kernels write no RoundedCopy and a multiply-and-round kernel makes the operand, as before
// (the tests compare both ways bit for bit).
inline bool rounded_copy_enabled() {
  const char* setting = std::getenv("LORA_EXT_ROUNDED_COPY");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

}  // namespace cuda
}  // namespace lora_ext
