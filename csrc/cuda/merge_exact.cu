// Exact merge in one pass over W (issue 3's merge target, issue 6's exactness): W += s·B·A, and a record of
// the elements that the matching unmerge (W -= s·B·A, the same kernel in subtract mode) would not bring back
// bit for bit, appended to a preallocated record. NOT YET RUN ON A GPU (written in session 3 without one).
//
// Why the prediction is exact: merge and unmerge compute d = s·Σ_j B[o, j]·A[j, k] with the same code (float32
// FMAs over j in ascending order, __fmul_rn for s), so d is bit-identical in both, and the merged value m and
// the unmerged value round(m − d) are computed here exactly as unmerge will compute them.
//
// The record: a block computes its tile in registers, counts its mismatches, and reserves that many slots with
// one atomicAdd. If the reservation fits the record's capacity the block writes its merged tile and its record
// entries and marks the tile done; otherwise it writes nothing (W stays original there) and records the first
// failed slot with atomicMin. The host then grows the record and relaunches for the tiles not done. Entries
// land in nondeterministic order, but each index appears once and restoring is a scatter: W comes back
// identical whatever the order.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "lora_gemm_launch.cuh"
#include "nvtx_range.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kRows = 16;       // rows of W per tile
constexpr int kCols = 256;      // columns per tile = threads per block: thread t owns column k0 + t
constexpr int kRankChunk = 32;  // ranks staged in shared memory at a time

struct ExactMergeParams {
  void* weight;
  const void* lora_A;  // (r, in), row stride a_stride
  const void* lora_B;  // (out, r), row stride b_stride
  int64_t a_stride, b_stride;
  int64_t out, in, rank;
  float scaling;
  bool subtract;  // unmerge: W -= s·B·A, no record
  int64_t* record_index;
  void* record_bits;  // W's original bits (same width as W's dtype)
  int64_t capacity;
  unsigned long long* state;  // [0] slots reserved, [1] first failed slot, [2] became non-finite
  uint8_t* tile_done;
};

template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using type = uint32_t;
};
template <>
struct Bits<at::Half> {
  using type = uint16_t;
};
template <>
struct Bits<at::BFloat16> {
  using type = uint16_t;
};

template <typename T>
__device__ __forceinline__ typename Bits<T>::type bits_of(T v) {
  typename Bits<T>::type b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename T, typename TW>
__global__ void __launch_bounds__(kCols) exact_merge_kernel(ExactMergeParams p) {
  using bits_t = typename Bits<T>::type;
  const int64_t tiles_per_row = (p.in + kCols - 1) / kCols;
  const int64_t tile = blockIdx.x;
  if (!p.subtract && p.tile_done[tile]) return;  // done by an earlier launch
  const int64_t o0 = (tile / tiles_per_row) * kRows, k0 = (tile % tiles_per_row) * kCols;
  const int t = threadIdx.x;
  const int64_t k = k0 + t;
  const bool column_ok = k < p.in;

  __shared__ float a_tile[kRankChunk][kCols];
  __shared__ float b_tile[kRows][kRankChunk];
  const TW* A = static_cast<const TW*>(p.lora_A);
  const TW* B = static_cast<const TW*>(p.lora_B);

  float d[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) d[i] = 0.f;
  for (int64_t j0 = 0; j0 < p.rank; j0 += kRankChunk) {
    for (int j = 0; j < kRankChunk; ++j) {
      const int64_t jj = j0 + j;
      a_tile[j][t] = (jj < p.rank && column_ok) ? static_cast<float>(A[jj * p.a_stride + k]) : 0.f;
    }
    for (int v = t; v < kRows * kRankChunk; v += kCols) {
      const int i = v / kRankChunk, j = v % kRankChunk;
      const int64_t o = o0 + i, jj = j0 + j;
      b_tile[i][j] = (o < p.out && jj < p.rank) ? static_cast<float>(B[o * p.b_stride + jj]) : 0.f;
    }
    __syncthreads();
    const int64_t chunk = p.rank - j0 < kRankChunk ? p.rank - j0 : kRankChunk;
    for (int j = 0; j < chunk; ++j) {  // ascending j: the same order in merge and unmerge
      const float a = a_tile[j][t];
#pragma unroll
      for (int i = 0; i < kRows; ++i) d[i] = fmaf(b_tile[i][j], a, d[i]);
    }
    __syncthreads();
  }

  T* W = static_cast<T*>(p.weight);
  T old_values[kRows], new_values[kRows];
  unsigned mismatches = 0;  // bit i: row o0 + i needs a record entry
  bool became_non_finite = false;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t o = o0 + i;
    if (!column_ok || o >= p.out) continue;
    const T w = W[o * p.in + k];
    const float delta = __fmul_rn(p.scaling, d[i]);
    old_values[i] = w;
    if (p.subtract) {
      new_values[i] = static_cast<T>(__fsub_rn(static_cast<float>(w), delta));
    } else {
      const T merged = static_cast<T>(__fadd_rn(static_cast<float>(w), delta));
      const T back = static_cast<T>(__fsub_rn(static_cast<float>(merged), delta));
      new_values[i] = merged;
      if (bits_of(back) != bits_of(w)) mismatches |= 1u << i;
      if (!isfinite(static_cast<float>(merged)) && isfinite(static_cast<float>(w))) became_non_finite = true;
    }
  }

  if (p.subtract) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (column_ok && o0 + i < p.out) W[(o0 + i) * p.in + k] = new_values[i];
    return;
  }

  // Block-wide exclusive prefix of the per-thread mismatch counts: warp scan, then a scan of the warp totals.
  __shared__ int warp_totals[kCols / 32];
  __shared__ long long block_start;
  __shared__ int block_ok;
  const int count = __popc(mismatches);
  const int lane = t % 32, warp = t / 32;
  int inclusive = count;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += n;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  if (became_non_finite) atomicOr(reinterpret_cast<unsigned long long*>(&p.state[2]), 1ull);
  __syncthreads();
  if (t == 0) {
    int total = 0;
    for (int w = 0; w < kCols / 32; ++w) {
      const int n = warp_totals[w];
      warp_totals[w] = total;  // now the exclusive start of each warp
      total += n;
    }
    long long start = 0;
    int ok = 1;
    if (total > 0) {
      start = static_cast<long long>(atomicAdd(&p.state[0], static_cast<unsigned long long>(total)));
      if (start + total > p.capacity) {
        ok = 0;
        atomicMin(&p.state[1], static_cast<unsigned long long>(start));
      }
    }
    block_start = start;
    block_ok = ok;
  }
  __syncthreads();
  if (!block_ok) return;  // W untouched in this tile; the host relaunches it with a larger record
  int64_t slot = block_start + warp_totals[warp] + inclusive - count;
  bits_t* record_bits = static_cast<bits_t*>(p.record_bits);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t o = o0 + i;
    if (!column_ok || o >= p.out) continue;
    W[o * p.in + k] = new_values[i];
    if (mismatches & (1u << i)) {
      p.record_index[slot] = o * p.in + k;
      record_bits[slot] = bits_of(old_values[i]);
      ++slot;
    }
  }
  if (t == 0) p.tile_done[tile] = 1;
}

// merge_exact_(weight, A, B, scaling, record_index, record_bits, state, tile_done): one launch over the tiles
// not yet done. subtract=True is the matching unmerge (no record; state and tile_done unused).
void merge_exact_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                      bool subtract, at::Tensor& record_index, at::Tensor& record_bits, at::Tensor& state,
                      at::Tensor& tile_done) {
  const char* op = "lora_ext::merge_exact_";
  check_merge_inputs(weight, lora_A, lora_B, op);
  check_scaling(scaling, op);
  LORA_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t tiles = ((out + kRows - 1) / kRows) * ((in + kCols - 1) / kCols);
  LORA_CHECK(tile_done.scalar_type() == at::kByte && tile_done.numel() == tiles && tile_done.is_contiguous(), op,
             ": tile_done must be a contiguous uint8 tensor of ", tiles, " elements");
  LORA_CHECK(state.scalar_type() == at::kLong && state.numel() == 3 && state.is_contiguous(), op,
             ": state must be a contiguous int64 tensor of 3 elements");
  LORA_CHECK(record_index.scalar_type() == at::kLong && record_index.is_contiguous(), op,
             ": record_index must be a contiguous int64 tensor");
  LORA_CHECK(record_bits.element_size() == weight.element_size() && record_bits.is_contiguous() &&
                 record_bits.numel() == record_index.numel(),
             op, ": record_bits must be contiguous, as long as record_index, with weight's element size");
  check_same_device(record_index, "record_index", weight, op, "weight");
  check_same_device(record_bits, "record_bits", weight, op, "weight");
  check_same_device(state, "state", weight, op, "weight");
  check_same_device(tile_done, "tile_done", weight, op, "weight");
  LORA_CHECK(tiles <= INT32_MAX, op, ": weight has too many 16 x 256 tiles for one launch (", tiles, ")");
  if (weight.numel() == 0) return;
  // d depends on the values only: contiguous adapters (a copy for a strided view) keep merge and unmerge exact.
  const at::Tensor A = lora_A.stride(1) == 1 ? lora_A : lora_A.contiguous();
  const at::Tensor B = lora_B.stride(1) == 1 ? lora_B : lora_B.contiguous();
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const NvtxRange range(op);
  ExactMergeParams p{};
  p.weight = weight.data_ptr();
  p.lora_A = A.data_ptr();
  p.lora_B = B.data_ptr();
  p.a_stride = A.stride(0);
  p.b_stride = B.stride(0);
  p.out = out;
  p.in = in;
  p.rank = lora_A.size(0);
  p.scaling = static_cast<float>(scaling);
  p.subtract = subtract;
  p.record_index = record_index.data_ptr<int64_t>();
  p.record_bits = record_bits.data_ptr();
  p.capacity = record_index.numel();
  p.state = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
  p.tile_done = tile_done.data_ptr<uint8_t>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_activation_and_adapter(weight.scalar_type(), lora_A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
    using T = decltype(act_tag);
    using TW = decltype(adapter_tag);
    exact_merge_kernel<T, TW><<<static_cast<unsigned>(tiles), kCols, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("merge_exact_", &merge_exact_cuda); }

}  // namespace cuda
}  // namespace lora_ext
