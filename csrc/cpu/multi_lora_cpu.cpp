// CPU kernel of lora_ext::multi_lora_forward (multi-adapter batches, inference): every token names its
// adapter slot in a stack of adapters. The base x·Wᵀ + b comes from ATen's BLAS (as in lora_forward); the
// low-rank term is computed in the accumulation type (float32, float64 for float64 x) by BLAS, per adapter slot
// over the tokens that name it, and added to y with one rounding. Padding rows of A / columns of B are zero
// and add exactly zero (for finite x).
#include "../error_message.h"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../no_autocast.h"

namespace lora_ext {
namespace {

// Every id in [-1, adapters): checked before anything is written, so a bad id leaves no partial output.
template <typename id_t>
void check_ids_in_range(const at::Tensor& ids, int64_t adapters, const char* op) {
  const id_t* data = ids.data_ptr<id_t>();
  const int64_t count = ids.numel();
  for (int64_t t = 0; t < count; ++t) {
    const int64_t id = static_cast<int64_t>(data[t]);
    LORA_CHECK(id >= -1 && id < adapters, op, ": adapter_ids[", t, "] = ", id, " is outside [-1, ", adapters,
                "): an id names a slot of the adapter stacks (n_adapters = ", adapters, ") or is -1 for the base "
                "layer alone");
  }
}

// Tokens grouped by slot (on the host: this is the CPU backend), then per slot used two BLAS products over its
// tokens: xa = x_g·A[a]ᵀ and y_g += s[a]·xa·B[a]ᵀ in the accumulation type, rounded once into y. Work and memory
// follow the slots the batch uses, not how many are loaded.
template <typename id_t>
std::vector<std::vector<int64_t>> tokens_by_slot(const at::Tensor& ids, int64_t adapters) {
  std::vector<std::vector<int64_t>> groups(adapters);
  const id_t* data = ids.data_ptr<id_t>();
  for (int64_t t = 0; t < ids.numel(); ++t) {
    const int64_t a = static_cast<int64_t>(data[t]);
    if (a >= 0) groups[a].push_back(t);
  }
  return groups;
}

void add_low_rank_terms(const at::Tensor& x, const at::Tensor& lora_A_stack, const at::Tensor& lora_B_stack,
                        const at::Tensor& scalings, const at::Tensor& ids, at::Tensor& y, const MultiLoraDims& d) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto groups = ids.scalar_type() == at::kLong ? tokens_by_slot<int64_t>(ids, d.adapters)
                                                     : tokens_by_slot<int32_t>(ids, d.adapters);
  const at::Tensor scale = scalings.to(at::kDouble).contiguous();
  const double* scale_data = scale.data_ptr<double>();
  for (int64_t a = 0; a < d.adapters; ++a) {
    if (groups[a].empty()) continue;
    const at::Tensor rows = at::tensor(groups[a], at::TensorOptions().dtype(at::kLong));
    const at::Tensor x_g = x.index_select(0, rows).to(acc);
    const at::Tensor xa = at::mm(x_g, lora_A_stack[a].to(acc).t());
    at::Tensor y_g = y.index_select(0, rows).to(acc);
    y_g.addmm_(xa, lora_B_stack[a].to(acc).t(), /*beta=*/1, /*alpha=*/scale_data[a]);
    y.index_copy_(0, rows, y_g.to(y.scalar_type()));  // one rounding of the float32 (float64) sum
  }
}

at::Tensor multi_lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& lora_A_stack, const at::Tensor& lora_B_stack,
                                  const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  const char* op = "lora_ext::multi_lora_forward";
  const MultiLoraDims d =
      check_multi_lora_inputs(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, op);
  const at::Tensor ids = adapter_ids.contiguous();
  if (ids.scalar_type() == at::kLong) {
    check_ids_in_range<int64_t>(ids, d.adapters, op);
  } else {
    check_ids_in_range<int32_t>(ids, d.adapters, op);
  }
  const NoAutocast no_autocast;  // the products in the inputs' dtypes (no_autocast.h)
  at::Tensor y = at::linear(x, weight, bias).contiguous();
  if (d.tokens == 0) return y;
  add_low_rank_terms(x, lora_A_stack, lora_B_stack, scalings, ids, y, d);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("multi_lora_forward", &multi_lora_forward_cpu); }

}  // namespace lora_ext
