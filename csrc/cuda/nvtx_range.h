// An NVTX range for the lifetime of a scope, so an nsys timeline shows each lora_ext operator
// (lora_ext::lora_forward, ...) around the kernels it launched. NVTX3 is header-only and costs a
// few nanoseconds when no profiler is attached.
#pragma once

#include <nvtx3/nvToolsExt.h>

namespace lora_ext {

class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace lora_ext
