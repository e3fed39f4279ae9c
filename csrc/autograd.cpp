// The autograd formula of lora_forward, in C++ (registered at the Autograd dispatch key, for every device).
//
// Why C++: the same formula written in Python (torch.library.register_autograd) cost ~40 µs of host time per
// training step on the CPU and more on the GPU, where small-token steps are bound by the host (see
// docs/perf-notes.md). torch.compile still traces through it: AOTAutograd runs this kernel on fake tensors
// and records the lora_forward / lora_backward calls it makes.
//
// Saved for backward: x, the frozen W, A, B, x·Aᵀ (tokens × r) and the 8-byte dropout seed. No dropped copy of
// x and no mask: lora_backward regenerates the mask from the seed.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace lora_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor value_or_undefined(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

using LoraForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const c10::optional<at::Tensor>&, const at::Tensor&,
                                                                  const at::Tensor&, double, double,
                                                                  const c10::optional<at::Tensor>&);

const c10::TypedOperatorHandle<LoraForwardSignature>& lora_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lora_ext::lora_forward", "").typed<LoraForwardSignature>();
  return op;
}

class LoraForwardFunction : public torch::autograd::Function<LoraForwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, double scaling, double dropout_p,
                               const c10::optional<at::Tensor>& dropout_seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, lora_activation] = lora_forward_op().call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, weight, lora_A, lora_B, lora_activation, value_or_undefined(dropout_seed)});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->mark_non_differentiable({lora_activation});
    // Undefined output gradients stay undefined: by default the engine would fill a zero tensor for x·Aᵀ's (never
    // defined: it is not differentiable) on every backward, a kernel and an allocation per step (v20).
    ctx->set_materialize_grads(false);
    return {y, lora_activation};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lora_ext::lora_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, double, double, const c10::optional<at::Tensor>&,
                             bool)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3];
    const at::Tensor &lora_activation = saved[4], &seed = saved[5];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensor inputs that were given: x, weight, [bias], lora_A, lora_B, [seed].
    const size_t bias_edges = has_bias ? 1 : 0;
    const bool needs_x = ctx->needs_input_grad(0), needs_weight = ctx->needs_input_grad(1);
    const bool needs_bias = has_bias && ctx->needs_input_grad(2);
    const bool needs_A = ctx->needs_input_grad(2 + bias_edges), needs_B = ctx->needs_input_grad(3 + bias_edges);

    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) {  // no gradient reached y (grads are not materialized): every input's is zero
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor()};
    }
    at::Tensor grad_x, grad_A, grad_B;
    if (needs_x || needs_A || needs_B) {
      std::tie(grad_x, grad_A, grad_B) =
          op.call(grad_y, x, weight, lora_A, lora_B, lora_activation, scaling, dropout_p,
                  seed.defined() ? c10::optional<at::Tensor>(seed) : c10::nullopt, needs_x);
    }
    // W and b are frozen in LoRA; should a user unfreeze them, they still get exact gradients.
    at::Tensor grad_weight = needs_weight ? grad_y.t().mm(x) : at::Tensor();
    at::Tensor grad_bias = needs_bias ? grad_y.sum(0) : at::Tensor();
    // One gradient per argument of forward, undefined for the non-tensor ones and the seed.
    return {needs_x ? grad_x : at::Tensor(),
            grad_weight,
            grad_bias,
            needs_A ? grad_A : at::Tensor(),
            needs_B ? grad_B : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> lora_forward_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         double scaling, double dropout_p,
                                                         const c10::optional<at::Tensor>& dropout_seed) {
  // Inference (no_grad, or nothing that requires grad): no graph node to build, so skip Function::apply's
  // context, saved variables and output wrapping — several µs of host time on a decoding-sized call. Not with a
  // forward-mode tangent on an input or inside a functorch transform (jvp, jacfwd): there Function::apply raises
  // that forward-mode AD is not implemented, where the operator alone would silently drop the tangent.
  const bool has_bias = bias.has_value() && bias->defined();
  const bool any_requires_grad = x.requires_grad() || weight.requires_grad() || lora_A.requires_grad() ||
                                 lora_B.requires_grad() || (has_bias && bias->requires_grad());
  const auto has_tangent = [](const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); };
  const bool any_tangent = has_tangent(x) || has_tangent(weight) || has_tangent(lora_A) || has_tangent(lora_B) ||
                           (has_bias && has_tangent(*bias));
  const bool in_functorch_transform =
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
  if (!any_tangent && !in_functorch_transform && (!at::GradMode::is_enabled() || !any_requires_grad)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return lora_forward_op().call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed);
  }
  auto outputs = LoraForwardFunction::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) { m.impl("lora_forward", &lora_forward_autograd); }

}  // namespace lora_ext
