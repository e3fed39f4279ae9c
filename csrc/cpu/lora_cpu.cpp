// CPU fallback: the same operators as csrc/cuda/, built from ATen's BLAS for the matrix products
// and the shared Philox mask (csrc/dropout_mask.h) for dropout. The low-rank part runs in the
// accumulation type (float32, or float64 for float64 inputs) and is rounded once into the output.
#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "../checks.h"
#include "../no_autocast.h"
#include "../dropout_mask.h"

namespace lora_ext {
namespace {

uint64_t read_seed(const c10::optional<at::Tensor>& dropout_seed) {
  return static_cast<uint64_t>(dropout_seed->item<int64_t>());
}

// Calls visit(i, factor) for every element i = row · cols + col of a (rows, cols) tensor, factor = keep_scale
// (≈ 1 / (1 − p)) where the mask keeps the element and 0 where it drops it: one Philox call decides 8 columns.
// The 8 factors of a group come from a table indexed by its 8 keep bits, so the visits of a group are plain loads
// and the compiler vectorises them (branching per element made the visits cost more than the Philox rounds).
template <typename scalar_t, typename Visit>
void for_each_keep_factor(uint64_t seed, int64_t rows, int64_t cols, double dropout_p, const Visit& visit) {
  const uint32_t threshold = dropout_threshold(dropout_p);
  const scalar_t kept = static_cast<scalar_t>(dropout_keep_scale(dropout_p));
  std::array<std::array<scalar_t, 8>, 256> factors_of;  // factors_of[bits][e]: kept if bit e is set, else 0
  for (int bits = 0; bits < 256; ++bits) {
    for (int e = 0; e < 8; ++e) factors_of[bits][e] = ((bits >> e) & 1) ? kept : scalar_t(0);
  }
  const int64_t whole_blocks = cols / 64;  // 8 groups of 8 columns at a time (dropout_keep8_x8)
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t row_start = row * cols;
      for (int64_t block = 0; block < whole_blocks; ++block) {
        unsigned keep[8];
        dropout_keep8_x8(seed, row, block * 8, threshold, keep);
        for (int lane = 0; lane < 8; ++lane) {
          const int64_t first = row_start + block * 64 + lane * 8;
          const scalar_t* factors = factors_of[keep[lane]].data();
          for (int e = 0; e < 8; ++e) visit(first + e, factors[e]);
        }
      }
      for (int64_t group = whole_blocks * 8; group * 8 < cols; ++group) {
        const unsigned keep = dropout_keep8(seed, row, group, threshold);
        for (int64_t col = group * 8; col < std::min<int64_t>(cols, group * 8 + 8); ++col) {
          visit(row_start + col, factors_of[keep][col - group * 8]);
        }
      }
    }
  });
}

// The keep mask as 0 / keep_scale in `dtype`, for dropout_keep_mask (tests and inspection).
at::Tensor scaled_keep_mask(uint64_t seed, int64_t rows, int64_t cols, double dropout_p, at::ScalarType dtype) {
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "lora_ext_scaled_keep_mask", [&] {
    scalar_t* out = mask.data_ptr<scalar_t>();
    for_each_keep_factor<scalar_t>(seed, rows, cols, dropout_p, [&](int64_t i, scalar_t factor) { out[i] = factor; });
  });
  return mask;
}

// dropout(x) = x · keep · keep_scale in the accumulation type, drawn and applied in one pass over x (a fresh
// tensor, never x itself); with `mask` also the 0 / keep_scale mask that backward applies to dx. A temporary of
// the CPU path only, regenerated wherever it is needed and never saved for backward.
at::Tensor dropped_input(const at::Tensor& x, double dropout_p, const c10::optional<at::Tensor>& dropout_seed,
                         at::ScalarType acc, at::Tensor* mask = nullptr) {
  if (dropout_p == 0.0) return x.to(acc);
  const at::Tensor source = x.to(acc).contiguous();
  at::Tensor dropped = at::empty_like(source);
  if (mask != nullptr) *mask = at::empty_like(source);
  AT_DISPATCH_FLOATING_TYPES(acc, "lora_ext_dropped_input", [&] {
    const scalar_t* in = source.data_ptr<scalar_t>();
    scalar_t* out = dropped.data_ptr<scalar_t>();
    scalar_t* mask_out = mask != nullptr ? mask->data_ptr<scalar_t>() : nullptr;
    for_each_keep_factor<scalar_t>(read_seed(dropout_seed), source.size(0), source.size(1), dropout_p,
                                   [&](int64_t i, scalar_t factor) {
                                     out[i] = in[i] * factor;
                                     if (mask_out != nullptr) mask_out[i] = factor;
                                   });
  });
  return dropped;
}

// dropped_input's dropout(x), and on the way grad_x += addend · mask (grad_x and addend contiguous, in `acc`).
at::Tensor dropped_input_adding_masked(const at::Tensor& x, double dropout_p,
                                       const c10::optional<at::Tensor>& dropout_seed, at::ScalarType acc,
                                       at::Tensor& grad_x, const at::Tensor& addend) {
  const at::Tensor source = x.to(acc).contiguous();
  TORCH_INTERNAL_ASSERT(grad_x.is_contiguous() && addend.is_contiguous() && grad_x.sizes() == source.sizes() &&
                        addend.sizes() == source.sizes() && grad_x.scalar_type() == acc && addend.scalar_type() == acc);
  at::Tensor dropped = at::empty_like(source);
  AT_DISPATCH_FLOATING_TYPES(acc, "lora_ext_dropped_input_adding_masked", [&] {
    const scalar_t* in = source.data_ptr<scalar_t>();
    const scalar_t* add = addend.data_ptr<scalar_t>();
    scalar_t* out = dropped.data_ptr<scalar_t>();
    scalar_t* grad = grad_x.data_ptr<scalar_t>();
    for_each_keep_factor<scalar_t>(read_seed(dropout_seed), source.size(0), source.size(1), dropout_p,
                                   [&](int64_t i, scalar_t factor) {
                                     out[i] = in[i] * factor;
                                     grad[i] += add[i] * factor;
                                   });
  });
  return dropped;
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling, double dropout_p,
                                                    const c10::optional<at::Tensor>& dropout_seed) {
  const char* op = "lora_ext::lora_forward";
  check_lora_inputs(x, weight, bias, lora_A, lora_B, op);
  check_dropout(dropout_p, dropout_seed, x, op);
  check_scaling(scaling, op);
  const NoAutocast no_autocast;  // the products in the inputs' dtypes (no_autocast.h)
  const auto acc = accumulate_type(x.scalar_type());
  // Every operand is 2-D (checked above): at::mm directly, without at::matmul's shape dispatch (≈ 1 µs per call,
  // which shows at decoding sizes).

  at::Tensor y = at::linear(x, weight, bias).contiguous();
  at::Tensor lora_activation = at::mm(dropped_input(x, dropout_p, dropout_seed, acc), lora_A.to(acc).t());
  if (y.scalar_type() == acc) {  // y += s·xa·Bᵀ in one BLAS call, no temporary
    y.addmm_(lora_activation, lora_B.to(acc).t(), /*beta=*/1, /*alpha=*/scaling);
  } else {
    // One rounding of the float32 sum for 16-bit outputs: TensorIterator computes add_ in float32.
    y.add_(at::mm(lora_activation, lora_B.to(acc).t()), scaling);
  }
  return {y, lora_activation};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& lora_activation, double scaling, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed, bool compute_grad_x) {
  const char* op = "lora_ext::lora_backward";
  const LoraDims dims = check_lora_inputs(x, weight, c10::nullopt, lora_A, lora_B, op);
  check_dropout(dropout_p, dropout_seed, x, op);
  const NoAutocast no_autocast;  // the products in the inputs' dtypes (no_autocast.h)
  check_backward_inputs(grad_y, lora_activation, dims, x, op);
  check_scaling(scaling, op);
  const auto acc = accumulate_type(x.scalar_type());
  const auto adapter_dtype = lora_A.scalar_type();

  const at::Tensor grad_y_acc = grad_y.to(acc);
  // d(loss)/d(lora_activation) = scaling · dy·B: (tokens, r).
  const at::Tensor grad_activation = at::mm(grad_y_acc, lora_B.to(acc)).mul_(scaling);
  at::Tensor grad_B = at::mm(grad_y_acc.t(), lora_activation).mul_(scaling).to(adapter_dtype);

  at::Tensor grad_x = compute_grad_x ? at::mm(grad_y, weight).contiguous() : at::empty({0}, x.options());
  at::Tensor x_dropped;
  if (compute_grad_x && dropout_p == 0.0 && grad_x.scalar_type() == acc) {
    x_dropped = x.to(acc);
    grad_x.addmm_(grad_activation, lora_A.to(acc));  // dx += dy_a·A in one BLAS call
  } else if (compute_grad_x && dropout_p > 0.0 && grad_x.scalar_type() == acc) {
    // The forward's mask, drawn again once for both uses: dropout(x) for grad_A and dx += (dy_a·A)·mask, in one
    // pass over x and dx (no mask tensor, no separate multiply-add pass).
    const at::Tensor lora_grad_x = at::mm(grad_activation, lora_A.to(acc)).contiguous();
    x_dropped = dropped_input_adding_masked(x, dropout_p, dropout_seed, acc, grad_x, lora_grad_x);
  } else {
    at::Tensor keep_scale;  // 0 or 1/(1-p), shared by grad_A and grad_x; the forward's mask, drawn again
    x_dropped = dropped_input(x, dropout_p, dropout_seed, acc, compute_grad_x ? &keep_scale : nullptr);
    if (compute_grad_x) {
      const at::Tensor lora_grad_x = at::mm(grad_activation, lora_A.to(acc));
      if (dropout_p > 0.0) {
        // dx += (dy_a·A)·mask in one pass, computed in float32 and rounded once into the 16-bit dx (the former
        // mul_ then add_ rounded the product to float32 first: a last-bit difference in ≈ 0.01% of elements).
        grad_x.addcmul_(lora_grad_x, keep_scale);
      } else {
        grad_x.add_(lora_grad_x);
      }
    }
  }
  at::Tensor grad_A = at::mm(grad_activation.t(), x_dropped).to(adapter_dtype);
  return {grad_x, grad_A, grad_B};
}

void merge_cpu_impl(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                    const char* op) {
  check_merge_inputs(weight, lora_A, lora_B, op);
  check_scaling(scaling, op);
  const NoAutocast no_autocast;  // the product in float32 / float64 (no_autocast.h)
  const auto acc = accumulate_type(weight.scalar_type());
  // W + s·B·A computed whole in the accumulation type, then rounded once into W.
  at::Tensor merged = at::addmm(weight.to(acc), lora_B.to(acc), lora_A.to(acc), /*beta=*/1, /*alpha=*/scaling);
  weight.copy_(merged);
}

void merge_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  merge_cpu_impl(weight, lora_A, lora_B, scaling, "lora_ext::merge_");
}

void unmerge_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  merge_cpu_impl(weight, lora_A, lora_B, -scaling, "lora_ext::unmerge_");
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& dropout_seed, int64_t rows, int64_t cols, double dropout_p) {
  const char* op = "lora_ext::dropout_keep_mask";
  LORA_CHECK(rows >= 0 && cols >= 0, op, ": rows and cols must be >= 0, got ", rows, " and ", cols);
  LORA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  LORA_CHECK(dropout_seed.scalar_type() == at::kLong && dropout_seed.numel() == 1, op,
              ": dropout_seed must be an int64 tensor with one element");
  return scaled_keep_mask(static_cast<uint64_t>(dropout_seed.item<int64_t>()), rows, cols, dropout_p, at::kFloat) != 0;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_forward", &lora_forward_cpu);
  m.impl("lora_backward", &lora_backward_cpu);
  m.impl("merge_", &merge_cpu);
  m.impl("unmerge_", &unmerge_cpu);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
}

}  // namespace lora_ext
