// The operators compute in their inputs' dtypes, autocast or not. An autocast region reaches our CPU and CUDA
// implementations through autocast's fallthrough with its thread-local state still set, so without this guard their
// own ATen calls (the base product at::linear, the CPU path's at::mm) would return 16-bit results for float32 inputs:
// a y of another dtype than the operator's schema (and fake implementation) promise, which the CUDA kernels would
// then write as float32, past its end. LoRALinear applies autocast itself (lora_ext/layer.py, _autocast_forward).
#pragma once

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace lora_ext {

// Holds autocast off for the ATen calls made in its scope.
class NoAutocast {
 public:
  NoAutocast() : guard_(c10::autocast_dispatch_keyset) {}

 private:
  c10::impl::ExcludeDispatchKeyGuard guard_;
};

}  // namespace lora_ext
