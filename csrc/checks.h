// Input checks shared by every backend. Each operator checks its inputs once, here, at the boundary,
// with messages that name the tensor and say what was expected, so a user can act on them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>
#include <utility>

#include "error_message.h"

namespace lora_ext {

struct LoraDims {
  int64_t tokens;
  int64_t in_features;
  int64_t out_features;
  int64_t rank;
};

inline std::string shape_string(const at::Tensor& t) { return concat(t.sizes()); }

// float64 inputs accumulate in float64; everything else in float32.
inline at::ScalarType accumulate_type(at::ScalarType activation) {
  return activation == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& reference, const char* op,
                              const char* reference_name = "x") {
  LORA_CHECK(t.device() == reference.device(), op, ": ", name, " is on ", t.device(), " but ", reference_name,
              " is on ", reference.device(), "; move all inputs to one device");
}

inline void check_activation_dtype(const at::Tensor& x, const char* op) {
  const auto dtype = x.scalar_type();
  if (x.is_cuda()) {
    LORA_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                ": on CUDA, x must be float32, float16 or bfloat16, got ", dtype);
  } else {
    LORA_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                ": on CPU, x must be float32, float64, bfloat16 or float16, got ", dtype);
  }
}

// scaling multiplies the low-rank term (and, in merge_/unmerge_, the update written into W in place):
// NaN or ±inf would silently poison every output, or the weight.
inline void check_scaling(double scaling, const char* op) {
  LORA_CHECK(std::isfinite(scaling), op, ": scaling must be a finite number, got ", scaling);
}

inline void check_dropout(double dropout_p, const c10::optional<at::Tensor>& dropout_seed, const at::Tensor& x,
                          const char* op) {
  LORA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    LORA_CHECK(dropout_seed.has_value() && dropout_seed->defined(), op,
                ": dropout_p > 0 needs a dropout_seed (an int64 tensor of shape (1,)); "
                "lora_ext.ops.new_dropout_seed(device) draws one from torch's generator");
    LORA_CHECK(dropout_seed->scalar_type() == at::kLong && dropout_seed->numel() == 1, op,
                ": dropout_seed must be an int64 tensor with one element, got ", dropout_seed->scalar_type(),
                " of shape ", shape_string(*dropout_seed));
    check_same_device(*dropout_seed, "dropout_seed", x, op);
  }
}

// x (tokens, in), weight (out, in), bias (out) or None, lora_A (r, in), lora_B (out, r).
inline LoraDims check_lora_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& lora_A, const at::Tensor& lora_B, const char* op) {
  LORA_CHECK(x.dim() == 2, op, ": x must be 2-D (tokens, in_features), got shape ", shape_string(x),
              " (lora_ext.ops.lora_linear flattens leading dimensions for you)");
  LORA_CHECK(x.is_floating_point(), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  check_activation_dtype(x, op);
  const int64_t tokens = x.size(0), in_features = x.size(1);
  LORA_CHECK(in_features >= 1, op, ": x must have at least one feature, got shape ", shape_string(x));

  LORA_CHECK(weight.dim() == 2 && weight.size(1) == in_features, op,
              ": weight must have shape (out_features, in_features) with in_features = x.size(-1) = ", in_features,
              ", got ", shape_string(weight));
  const int64_t out_features = weight.size(0);
  LORA_CHECK(out_features >= 1, op, ": weight must have at least one row, got shape ", shape_string(weight));
  LORA_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  check_same_device(weight, "weight", x, op);

  if (bias.has_value() && bias->defined()) {
    LORA_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must have shape (out_features,) = (",
                out_features, ",), got ", shape_string(*bias));
    LORA_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " does not match x dtype ", x.scalar_type());
    check_same_device(*bias, "bias", x, op);
  }

  LORA_CHECK(lora_A.dim() == 2 && lora_A.size(0) >= 1 && lora_A.size(1) == in_features, op,
              ": lora_A must have shape (r, in_features) = (r, ", in_features, ") with r >= 1, got ",
              shape_string(lora_A));
  const int64_t rank = lora_A.size(0);
  LORA_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out_features && lora_B.size(1) == rank, op,
              ": lora_B must have shape (out_features, r) = (", out_features, ", ", rank, "), got ",
              shape_string(lora_B));
  LORA_CHECK(lora_A.scalar_type() == lora_B.scalar_type(), op, ": lora_A dtype ", lora_A.scalar_type(),
              " and lora_B dtype ", lora_B.scalar_type(), " differ");
  LORA_CHECK(lora_A.scalar_type() == x.scalar_type() || lora_A.scalar_type() == at::kFloat, op,
              ": adapter dtype ", lora_A.scalar_type(), " must be x's dtype (", x.scalar_type(), ") or float32");
  check_same_device(lora_A, "lora_A", x, op);
  check_same_device(lora_B, "lora_B", x, op);
  return LoraDims{tokens, in_features, out_features, rank};
}

inline void check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& lora_activation, const LoraDims& dims,
                                  const at::Tensor& x, const char* op) {
  LORA_CHECK(grad_y.dim() == 2 && grad_y.size(0) == dims.tokens && grad_y.size(1) == dims.out_features, op,
              ": grad_y must have shape (tokens, out_features) = (", dims.tokens, ", ", dims.out_features,
              "), got ", shape_string(grad_y));
  LORA_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y dtype ", grad_y.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  check_same_device(grad_y, "grad_y", x, op);
  LORA_CHECK(lora_activation.dim() == 2 && lora_activation.size(0) == dims.tokens &&
                  lora_activation.size(1) == dims.rank,
              op, ": lora_activation (the forward's x·Aᵀ) must have shape (tokens, r) = (", dims.tokens, ", ",
              dims.rank, "), got ", shape_string(lora_activation));
  LORA_CHECK(lora_activation.scalar_type() == accumulate_type(x.scalar_type()), op,
              ": lora_activation must be ", accumulate_type(x.scalar_type()), ", got ",
              lora_activation.scalar_type());
  check_same_device(lora_activation, "lora_activation", x, op);
}

struct MultiLoraDims {
  int64_t tokens;
  int64_t in_features;
  int64_t out_features;
  int64_t adapters;  // n, the stack's slot count
  int64_t max_rank;  // r_max; adapters of lower rank are zero-padded
};

// multi_lora_forward: x (tokens, in), weight (out, in), bias (out) or None, lora_A_stack (n, r_max, in),
// lora_B_stack (n, out, r_max), scalings (n,) float32/float64, adapter_ids (tokens,) int64/int32. Shapes,
// dtypes and devices only: the ids' values are checked by the CPU kernel (reading them on CUDA would sync).
inline MultiLoraDims check_multi_lora_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A_stack,
                                             const at::Tensor& lora_B_stack, const at::Tensor& scalings,
                                             const at::Tensor& adapter_ids, const char* op) {
  LORA_CHECK(x.dim() == 2, op, ": x must be 2-D (tokens, in_features), got shape ", shape_string(x),
              " (lora_ext.ops.multi_lora_linear flattens leading dimensions for you)");
  LORA_CHECK(x.is_floating_point(), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  check_activation_dtype(x, op);
  const int64_t tokens = x.size(0), in_features = x.size(1);
  LORA_CHECK(in_features >= 1, op, ": x must have at least one feature, got shape ", shape_string(x));

  LORA_CHECK(weight.dim() == 2 && weight.size(1) == in_features, op,
              ": weight must have shape (out_features, in_features) with in_features = x.size(-1) = ", in_features,
              ", got ", shape_string(weight));
  const int64_t out_features = weight.size(0);
  LORA_CHECK(out_features >= 1, op, ": weight must have at least one row, got shape ", shape_string(weight));
  LORA_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  check_same_device(weight, "weight", x, op);
  if (bias.has_value() && bias->defined()) {
    LORA_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must have shape (out_features,) = (",
                out_features, ",), got ", shape_string(*bias));
    LORA_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " does not match x dtype ", x.scalar_type());
    check_same_device(*bias, "bias", x, op);
  }

  LORA_CHECK(lora_A_stack.dim() == 3 && lora_A_stack.size(0) >= 1 && lora_A_stack.size(1) >= 1 &&
                  lora_A_stack.size(2) == in_features,
              op, ": lora_A_stack must have shape (n_adapters, r_max, in_features) = (n, r_max, ", in_features,
              ") with n >= 1 and r_max >= 1, got ", shape_string(lora_A_stack));
  const int64_t adapters = lora_A_stack.size(0), max_rank = lora_A_stack.size(1);
  LORA_CHECK(lora_B_stack.dim() == 3 && lora_B_stack.size(0) == adapters && lora_B_stack.size(1) == out_features &&
                  lora_B_stack.size(2) == max_rank,
              op, ": lora_B_stack must have shape (n_adapters, out_features, r_max) = (", adapters, ", ",
              out_features, ", ", max_rank, "), got ", shape_string(lora_B_stack));
  LORA_CHECK(lora_A_stack.scalar_type() == lora_B_stack.scalar_type(), op, ": lora_A_stack dtype ",
              lora_A_stack.scalar_type(), " and lora_B_stack dtype ", lora_B_stack.scalar_type(), " differ");
  LORA_CHECK(lora_A_stack.scalar_type() == x.scalar_type() || lora_A_stack.scalar_type() == at::kFloat, op,
              ": adapter stack dtype ", lora_A_stack.scalar_type(), " must be x's dtype (", x.scalar_type(),
              ") or float32");
  check_same_device(lora_A_stack, "lora_A_stack", x, op);
  check_same_device(lora_B_stack, "lora_B_stack", x, op);

  LORA_CHECK(scalings.dim() == 1 && scalings.size(0) == adapters, op,
              ": scalings must have shape (n_adapters,) = (", adapters, ",), one per adapter slot, got ",
              shape_string(scalings));
  LORA_CHECK(scalings.scalar_type() == at::kFloat || scalings.scalar_type() == at::kDouble, op,
              ": scalings must be float32 (or float64), got ", scalings.scalar_type());
  check_same_device(scalings, "scalings", x, op);

  LORA_CHECK(adapter_ids.scalar_type() == at::kLong || adapter_ids.scalar_type() == at::kInt, op,
              ": adapter_ids must be int64 or int32 (an adapter slot per token, -1 = base only), got ",
              adapter_ids.scalar_type());
  LORA_CHECK(adapter_ids.dim() == 1 && adapter_ids.size(0) == tokens, op,
              ": adapter_ids must have shape (tokens,) = (", tokens, ",), got ", shape_string(adapter_ids));
  check_same_device(adapter_ids, "adapter_ids", x, op);
  return MultiLoraDims{tokens, in_features, out_features, adapters, max_rank};
}

// Whether a and b may share memory. at::get_overlap_status decides exactly for dense tensors; for strided
// views of one storage it answers TooHard, and then intersecting address ranges count as sharing
// (conservative: interleaved views such as buf[:, ::2] and buf[:, 1::2] are reported too).
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  const auto status = at::get_overlap_status(a, b);
  if (status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial) return true;
  if (status != at::MemOverlapStatus::TooHard || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.has_storage() || !b.has_storage() || !a.storage().is_alias_of(b.storage())) return false;
  const auto range = [](const at::Tensor& t) {  // [first byte, one past the last byte] that t addresses
    const char* first = static_cast<const char*>(t.data_ptr());
    int64_t last_element = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last_element += (t.size(d) - 1) * t.stride(d);
    return std::make_pair(first, first + (last_element + 1) * static_cast<int64_t>(t.element_size()));
  };
  const auto [a_first, a_end] = range(a);
  const auto [b_first, b_end] = range(b);
  return a_first < b_end && b_first < a_end;
}

// weight (out, in) updated in place by ±scaling·B·A.
inline void check_merge_inputs(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                               const char* op) {
  LORA_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ", shape_string(weight));
  LORA_CHECK(weight.is_floating_point(), op, ": weight must be floating point, got ", weight.scalar_type());
  check_activation_dtype(weight, op);
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  LORA_CHECK(lora_A.dim() == 2 && lora_A.size(0) >= 1 && lora_A.size(1) == in_features, op,
              ": lora_A must have shape (r, in_features) = (r, ", in_features, ") with r >= 1, got ",
              shape_string(lora_A));
  LORA_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out_features && lora_B.size(1) == lora_A.size(0), op,
              ": lora_B must have shape (out_features, r) = (", out_features, ", ", lora_A.size(0), "), got ",
              shape_string(lora_B));
  LORA_CHECK(lora_A.scalar_type() == lora_B.scalar_type(), op, ": lora_A dtype ", lora_A.scalar_type(),
              " and lora_B dtype ", lora_B.scalar_type(), " differ");
  LORA_CHECK(lora_A.scalar_type() == weight.scalar_type() || lora_A.scalar_type() == at::kFloat, op,
              ": adapter dtype ", lora_A.scalar_type(), " must be weight's dtype (", weight.scalar_type(),
              ") or float32");
  check_same_device(lora_A, "lora_A", weight, op, "weight");
  check_same_device(lora_B, "lora_B", weight, op, "weight");
  // weight is written in place: each of its elements must own its memory (an expand()ed weight would be
  // updated by several threads at once), and it must not share memory with the adapters it reads.
  LORA_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes, op,
              ": weight has elements that share memory (e.g. an expand()ed tensor) and is written in place; "
              "pass weight.clone()");
  LORA_CHECK(!may_share_memory(weight, lora_A), op,
              ": weight and lora_A share memory; weight is written in place, so pass a copy of lora_A");
  LORA_CHECK(!may_share_memory(weight, lora_B), op,
              ": weight and lora_B share memory; weight is written in place, so pass a copy of lora_B");
}

}  // namespace lora_ext
