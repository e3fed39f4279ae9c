// Every lora_ext operator's schema, in one place. The backends register their kernels in
// csrc/cpu/ and csrc/cuda/ (TORCH_LIBRARY_IMPL), csrc/autograd.cpp the autograd formula of lora_forward;
// lora_ext/ops.py registers the fake (meta) implementations, so torch.compile traces the ops without graph breaks.
#include <torch/library.h>
#include <torch/extension.h>

TORCH_LIBRARY(lora_ext, m) {
  // y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ for 2-D x (tokens, in_features). Also returns
  // lora_activation = dropout(x)·Aᵀ (tokens, r) in float32 (float64 for float64 x): the one tensor that
  // backward needs beyond x. dropout(x) = x · keep · keep_scale(p), keep drawn from dropout_seed and
  // keep_scale(p) ≈ 1 / (1 − p) exactly inverting the kept fraction (csrc/dropout_mask.h).
  m.def(
      "lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor? dropout_seed) -> (Tensor y, Tensor lora_activation)");
  // Gradients of lora_forward with respect to x, lora_A and lora_B (W and b are frozen). grad_x is an
  // empty tensor of shape (0,) when compute_grad_x is false.
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor lora_activation, float scaling, float dropout_p, Tensor? dropout_seed, bool compute_grad_x) "
      "-> (Tensor grad_x, Tensor grad_A, Tensor grad_B)");
  // weight += scaling · B·A (merge_) or weight -= scaling · B·A (unmerge_), in place, accumulated in
  // float32 (float64 for float64 weights) and rounded once.
  m.def("merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling) -> ()");
  m.def("unmerge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling) -> ()");
  // Multi-adapter batches (inference): each token names its adapter. x (tokens, in); lora_A_stack (n, r_max, in)
  // and lora_B_stack (n, out, r_max) hold n adapters, those of rank r < r_max zero-padded (A rows r.., B columns
  // r..), so the padding adds exactly zero; scalings (n,) float32 (or float64) per adapter (alpha / r);
  // adapter_ids (tokens,) int64 or int32, -1 = the base layer alone. y[t] = x[t]·Wᵀ + b
  // + scalings[a]·(x[t]·A[a]ᵀ)·B[a]ᵀ, a = adapter_ids[t]; the low-rank term accumulated in float32 (float64 for
  // float64 x) and rounded once into y, as lora_forward does. On CPU, ids outside [-1, n) are an error raised
  // before anything is written; on CUDA (no host-device sync) they are treated as -1. No autograd formula.
  m.def(
      "multi_lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A_stack, Tensor lora_B_stack, "
      "Tensor scalings, Tensor adapter_ids) -> Tensor y");
  // Exact merge in one pass (csrc/merge_exact_layout.h has the layouts): weight += scaling·B·A, appending to
  // record the tile-local index and original bits of each element that the matching unmerge (subtract=True:
  // weight -= scaling·B·A with the same arithmetic, then the record put back) would not restore. state (zeroed
  // by the caller) = [slots reserved, slots written, flags, one word per 32 × 256 tile]; a tile whose entries
  // do not fit stays unmerged, for a relaunch with a larger record. adapter_copy (or an empty tensor): the merge
  // writes lora_A and lora_B there, the unmerge subtracts that copy and flags a changed adapter in state[2].
  m.def(
      "merge_exact_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling, bool subtract, "
      "Tensor(b!) record, Tensor(c!) state, Tensor(d!) adapter_copy) -> ()");
  // The boolean keep mask (rows, cols) that the kernels draw for dropout_seed; for tests and inspection.
  m.def("dropout_keep_mask(Tensor dropout_seed, int rows, int cols, float dropout_p) -> Tensor");
}

// Importing lora_ext._C loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lora_ext operators; use them through torch.ops.lora_ext or the lora_ext package";
  module.def(
      "built_with_sm90a",
      [] {
#if defined(LORA_EXT_HAS_SM90A)
        return true;
#else
        return false;
#endif
      },
      "Whether this build carries the Hopper (sm_90a) kernels: the fused forward GEMM on H100/H200.");
}
