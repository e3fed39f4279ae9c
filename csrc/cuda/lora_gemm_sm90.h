// The forward GEMM with the LoRA expand folded in, for Hopper GPUs (lora_gemm_sm90.cu):
//
//   y = x·Wᵀ + b + xs·Bᵀ      x (tokens × in), W (out × in), xs = s·dropout(x)·Aᵀ (tokens × r), B (out × r)
//
// as one GEMM whose K runs over in + r: the rank-r term becomes extra K steps of the base product, so y is
// written once, already updated, instead of being written by cuBLAS and then read and written again by the
// expand kernel (128 MB at 8192 × 4096 bf16).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace lora_ext {
namespace cuda {

// True when this build carries the sm_90a kernel and it is the image that loads on x's GPU (compute capability 9.0;
// checked once per device), the operands suit the copy
// engine (16-bit x, W, xs and B of one dtype, rows 16-byte aligned, unit column stride) and the shape is one where
// it beats cuBLAS plus the expand (≥ 4096 tokens, out ≥ 2048, in ≤ 4096, or ≤ 6144 for r > 16; docs/perf-notes.md
// v8, v13).
// LORA_EXT_FUSED_GEMM=0 turns it off, LORA_EXT_FUSED_GEMM=force on for every shape it supports (the tests' shapes).
bool fused_lora_gemm_usable(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            int64_t rank);

// y (tokens × out, x's dtype, new) = x·Wᵀ + b + xs·Bᵀ, float32 accumulation, one rounding. xs and lora_B are in
// x's dtype with rows 16-byte aligned (lora_gemm_operand pads them).
at::Tensor fused_lora_gemm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& xs, const at::Tensor& lora_B);

// The same for a batch of several adapters (multi_lora.cu), per pair of kMultiLoraPairRows rows of x (a cluster's
// two tiles): pair_passes[p] (int32, ⌈tokens / 256⌉) rank-r terms, term i with the B of slot pair_slot_list[p][i]
// (int32, (pairs × S), S ≤ kMultiLoraMaxPairSlots terms at most per pair) from lora_B_rows, the (slots·out × r) stack
// of every slot's B, and with its own 256 rows of xs_by_pass, rows (p·S + i)·256 …: the pair's rows of that slot,
// s·xa, and zeros for the others. A negative pair_passes[p] leaves the pair's terms out (the caller adds them).
constexpr int kMultiLoraPairRows = 256;
constexpr int kMultiLoraMaxPairSlots = 16;
at::Tensor fused_multi_lora_gemm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& xs_by_pass, const at::Tensor& lora_B_rows,
                                 const at::Tensor& pair_passes, const at::Tensor& pair_slot_list);

// The backward's dx by the same kernel, with W read as it lies (K = out along its rows, N = in contiguous):
//
//   dx = dy·W + dxs·A      dy (tokens × out), W (out × in), dxs = keep_scale·dxa (tokens × r), A (r × in)
//
// as one GEMM whose K runs over out + r, in place of cuBLAS's dy·W followed by the expand kernel's read and write of
// dx. With dropout, keep[t, k] multiplies (dxs·A)[t, k]: the rank-r K blocks run first, the consumers zero the dropped
// elements of that partial sum (the mask read as keep bytes drawn earlier in the backward), then the base product
// adds on.
// Usable under the same conditions as the forward's, for the GEMM of this shape (M = tokens, K = out, N = in), dy
// and W in one 16-bit dtype, where it pays: ≥ 1024 tokens, in ≥ 2048, out ≤ 11008 (v13). LORA_EXT_FUSED_GRAD_X=0
// turns just this one off.
bool fused_lora_grad_x_usable(const at::Tensor& grad_y, const at::Tensor& weight, int64_t rank);

// dx (tokens × in, dy's dtype, new) = dy·W + keep ⊙ (dxs·A), float32 accumulation, one rounding; dxs carries the
// dropout's keep scale. dxs and lora_A are in dy's dtype with rows 16-byte aligned (lora_gemm_operand pads them).
// keep_bytes: undefined for no mask, else the mask of x as dropout_keep_bytes.cuh writes it (tokens × a pitch of
// whole 32-byte runs, 16-byte aligned).
at::Tensor fused_lora_grad_x(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_s,
                             const at::Tensor& lora_A, const at::Tensor& keep_bytes);

// A (rows × r) operand as the copy engine needs it: in `dtype`, unit column stride, the row pitch a multiple of
// 8 elements (16 bytes), from a 16-byte-aligned address. Returns `t` itself when it already is; else a view of a
// padded copy (the padding columns are left unwritten: the kernel's tensor maps stop at r and read zeros past it).
at::Tensor lora_gemm_operand(const at::Tensor& t, at::ScalarType dtype, double scale = 1.0);

// An unwritten (rows × r) operand in lora_gemm_operand's padded layout, for a kernel that produces the rank-r values
// to write as well (the shrink's and the dy pass's RoundedCopy), which saves lora_gemm_operand's own kernel.
inline at::Tensor new_lora_gemm_operand(int64_t rows, int64_t rank, const at::TensorOptions& options) {
  const int64_t pitch = (rank + 7) / 8 * 8;
  return at::empty({rows, pitch}, options).narrow(1, 0, rank);
}

// operand[first_row:] = values[first_row:] · scale, rounded once to operand's dtype: the rows a kernel's RoundedCopy
// did not write (all of them where another path ran, or a tail). Computed in float32, as those kernels do.
inline void finish_lora_gemm_operand(at::Tensor& operand, const at::Tensor& values, double scale, int64_t first_row) {
  const int64_t rows = values.size(0) - first_row;
  if (rows <= 0) return;
  at::Tensor target = operand.narrow(0, first_row, rows);
  const at::Tensor source = values.narrow(0, first_row, rows);
  if (scale == 1.0) {
    target.copy_(source);
  } else {
    at::mul_out(target, source, at::scalar_tensor(scale, source.options().dtype(at::kDouble).device(at::kCPU)));
  }
}

}  // namespace cuda
}  // namespace lora_ext
