// CPU kernel of lora_ext::multi_lora_forward (multi-adapter batches, inference): every token names its
// adapter slot in a stack of adapters. The base x·Wᵀ + b comes from ATen's BLAS (as in lora_forward); the
// low-rank term of each token is computed in the accumulation type (float32, float64 for float64 x) and
// added to y with one rounding. Tokens run in parallel (at::parallel_for); each token reads its own slot of
// the stacks, so no grouping by adapter is needed. Padding rows of A / columns of B are zero and add exactly
// zero (for finite x).
#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

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

template <typename scalar_t, typename adapter_t, typename acc_t, typename id_t>
void add_low_rank_terms(const at::Tensor& x, const at::Tensor& lora_A_stack, const at::Tensor& lora_B_stack,
                        const at::Tensor& scalings, const at::Tensor& ids, at::Tensor& y, const MultiLoraDims& d) {
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const adapter_t* a_data = lora_A_stack.data_ptr<adapter_t>();
  const adapter_t* b_data = lora_B_stack.data_ptr<adapter_t>();
  const id_t* id_data = ids.data_ptr<id_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  const int64_t in = d.in_features, out = d.out_features, rank = d.max_rank;
  // Scalings as the accumulation type: read once, on the host (CPU tensors).
  std::vector<acc_t> scale(d.adapters);
  {
    const at::Tensor s = scalings.to(at::kDouble).contiguous();
    const double* s_data = s.data_ptr<double>();
    for (int64_t a = 0; a < d.adapters; ++a) scale[a] = static_cast<acc_t>(s_data[a]);
  }
  // A grain of a few tokens: each token costs r_max · (in + out) multiply-adds.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rank * (in + out)));
  at::parallel_for(0, d.tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xa(rank);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t a = static_cast<int64_t>(id_data[t]);
      if (a < 0) continue;  // -1: the base layer alone
      const scalar_t* xt = x_data + t * in;
      const adapter_t* A = a_data + a * rank * in;
      const adapter_t* B = b_data + a * out * rank;
      for (int64_t k = 0; k < rank; ++k) {
        const adapter_t* Ak = A + k * in;
        acc_t sum = 0;
        for (int64_t i = 0; i < in; ++i) sum += static_cast<acc_t>(xt[i]) * static_cast<acc_t>(Ak[i]);
        xa[k] = sum;
      }
      const acc_t s = scale[a];
      scalar_t* yt = y_data + t * out;
      for (int64_t o = 0; o < out; ++o) {
        const adapter_t* Bo = B + o * rank;
        acc_t sum = 0;
        for (int64_t k = 0; k < rank; ++k) sum += xa[k] * static_cast<acc_t>(Bo[k]);
        yt[o] = static_cast<scalar_t>(static_cast<acc_t>(yt[o]) + s * sum);  // one rounding of the sum
      }
    }
  });
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
  at::Tensor y = at::linear(x, weight, bias).contiguous();
  if (d.tokens == 0) return y;
  const at::Tensor x_c = x.contiguous();
  const at::Tensor A = lora_A_stack.contiguous();
  const at::Tensor B = lora_B_stack.contiguous();
  const bool float_adapters = A.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_ext_multi_lora_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = [&](auto adapter_tag, auto id_tag) {
      using adapter_t = decltype(adapter_tag);
      using id_t = decltype(id_tag);
      add_low_rank_terms<scalar_t, adapter_t, acc_t, id_t>(x_c, A, B, scalings, ids, y, d);
    };
    const auto with_ids = [&](auto adapter_tag) {
      if (ids.scalar_type() == at::kLong) {
        run(adapter_tag, int64_t{});
      } else {
        run(adapter_tag, int32_t{});
      }
    };
    if (float_adapters) {
      with_ids(float{});
    } else {
      with_ids(scalar_t{});
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("multi_lora_forward", &multi_lora_forward_cpu); }

}  // namespace lora_ext
