// Exact merge in one pass over W (issue 3's merge target, issue 6's exactness): W += s·B·A, and a record of
// the elements that the matching unmerge (W -= s·B·A, the same kernel in subtract mode) would not bring back
// bit for bit. The layout of the record, of `state` and of the adapter copy is in ../merge_exact_layout.h.
//
// Why the prediction is exact: merge and unmerge compute d = s·Σ_j B[o, j]·A[j, k] with the same code (float32
// FMAs over j in ascending order from 0, then __fmul_rn by s; the explicit intrinsics keep nvcc from contracting
// or reordering anything), so d is bit-identical in both, and the merged value m and the unmerged value
// round(m − d) are computed here exactly as unmerge will compute them. The unmerge takes A and B from the copy
// the merge wrote, so d stays the same even if the adapter was edited through .data in between.
//
// Grid and tile: one block of 256 threads per 32 × 256 tile of W (the record's unit). Warp w owns the tile's rows
// 4w .. 4w+3, lane l its columns 8l .. 8l+7, so a thread handles 32 elements: one or two 16-byte loads and stores
// per row (8 bf16/fp16 or 2 × 4 float32), a warp 512 or 1024 contiguous bytes per row. Bytes moved: W read once
// and written once, plus the record (merge: written, about 4 bytes per recorded element; unmerge: read and
// scattered inside the tile, which is still in L2); A and B come from L2 (A's column slice is re-read once per
// 32 rows). Why this shape (the first version, one column and 16 rows per thread with scalar 2-byte accesses,
// took ≈ 5.7× W.clone() on an H100):
//   * the thread issues its W loads first, so they are in flight while the adapter is staged and d computed;
//   * d for 4 rows × 8 columns is a register tile: per rank j, 2 float4 of A and 1 float4 of B from shared
//     memory feed 32 FMAs, so shared-memory traffic is 1/4 of what one-row-per-thread would need (the FMAs,
//     r per element, are the kernel's real arithmetic floor: ≈ 9 µs for 4096² at r = 16 on an H100);
//   * A and B are staged as float (no conversion inside the FMA loop), 16 ranks at a time (18 KB of shared
//     memory, two blocks per SM at ≤ 128 registers), one __syncthreads for r ≤ 16;
//   * the merge reserves its tile's record slots with one atomicAdd per block, and only when the tile has
//     mismatches (most tiles in low-rank merges have few); the unmerge applies its tile's entries itself, after
//     its stores, instead of a separate scatter kernel over W.
// When W's rows are not 16-byte aligned (a view, or in_features not a multiple of 8 / 4) the same kernel runs
// with one scalar access per element (kVec = false): same arithmetic, same bits.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../merge_exact_layout.h"
#include "lora_gemm_launch.cuh"
#include "nvtx_range.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerThread = kMergeTileRows / kWarps;  // 4
constexpr int kColsPerThread = kMergeTileCols / 32;      // 8
constexpr int kElements = kRowsPerThread * kColsPerThread;  // 32: one bit each in a mismatch mask
constexpr int kRankChunk = 16;                              // ranks staged in shared memory at a time
static_assert(kRowsPerThread == 4, "b_tile holds a thread's 4 rows as one float4");
static_assert(kColsPerThread == 8, "a_tile holds a thread's 8 columns as two float4");
static_assert(kElements == 32, "the mismatch mask is 32 bits");

struct ExactMergeParams {
  void* weight;
  const void* lora_A;  // (r, in), row stride a_stride: the adapter now
  const void* lora_B;  // (out, r), row stride b_stride
  int64_t a_stride, b_stride;
  void* adapter_copy;  // nullptr, or A then B contiguous: written by the merge, read by the unmerge
  int64_t out, in, rank;
  float scaling;
  void* record;  // entries (merge_exact_layout.h)
  int64_t capacity;
  unsigned long long* state;  // header, then one word per tile
};

template <typename T>
struct Bits {
  using type = uint16_t;  // at::Half, at::BFloat16
  using entry = uint32_t;
};
template <>
struct Bits<float> {
  using type = uint32_t;
  using entry = unsigned long long;
};

template <typename T>
__device__ __forceinline__ typename Bits<T>::type bits_of(T v) {
  typename Bits<T>::type b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename T>
__device__ __forceinline__ T from_bits(typename Bits<T>::type b) {
  T v;
  memcpy(&v, &b, sizeof(b));
  return v;
}

// A thread's 4 × 8 elements of W, as bits (element e = 8·i + c is row o0 + i, column k0 + c); elements outside
// W are neither read nor written.
template <typename T, bool kVec>
__device__ __forceinline__ void load_elements(const T* W, int64_t out, int64_t in, int64_t o0, int64_t k0,
                                              typename Bits<T>::type (&w)[kElements]) {
  constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    if (o0 + i >= out) continue;
    const T* row = W + (o0 + i) * in;
#pragma unroll
    for (int v = 0; v < kColsPerThread / kPerVec; ++v) {
      if constexpr (kVec) {  // in % kPerVec == 0: a vector is wholly inside W or wholly outside
        if (k0 + v * kPerVec < in) {
          const uint4 q = __ldcs(reinterpret_cast<const uint4*>(row + k0 + v * kPerVec));  // W is read once
          memcpy(&w[kColsPerThread * i + kPerVec * v], &q, sizeof(q));
        }
      } else {
#pragma unroll
        for (int c = v * kPerVec; c < (v + 1) * kPerVec; ++c)
          if (k0 + c < in) w[kColsPerThread * i + c] = bits_of(row[k0 + c]);
      }
    }
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void store_elements(T* W, int64_t out, int64_t in, int64_t o0, int64_t k0,
                                               const typename Bits<T>::type (&w)[kElements]) {
  constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    if (o0 + i >= out) continue;
    T* row = W + (o0 + i) * in;
#pragma unroll
    for (int v = 0; v < kColsPerThread / kPerVec; ++v) {
      if constexpr (kVec) {
        if (k0 + v * kPerVec < in) {
          uint4 q;
          memcpy(&q, &w[kColsPerThread * i + kPerVec * v], sizeof(q));
          __stcs(reinterpret_cast<uint4*>(row + k0 + v * kPerVec), q);
        }
      } else {
#pragma unroll
        for (int c = v * kPerVec; c < (v + 1) * kPerVec; ++c)
          if (k0 + c < in) row[k0 + c] = from_bits<T>(w[kColsPerThread * i + c]);
      }
    }
  }
}

template <typename TW>
__device__ __forceinline__ bool same_bits(TW a, TW b) {
  return bits_of(a) == bits_of(b);
}

template <typename T, typename TW, bool kVec, bool kSubtract>
__global__ void __launch_bounds__(kThreads, 2) exact_merge_kernel(const ExactMergeParams p) {
  using bits_t = typename Bits<T>::type;
  using entry_t = typename Bits<T>::entry;
  const int64_t tiles_per_row = (p.in + kMergeTileCols - 1) / kMergeTileCols;
  const int64_t tile = blockIdx.x;
  const int64_t row_block = tile / tiles_per_row, col_tile = tile % tiles_per_row;
  unsigned long long* tile_state = p.state + kMergeStateHeader + tile;
  const unsigned long long tile_word = *tile_state;
  if (!kSubtract && tile_word != 0) return;  // merged by an earlier launch
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tile_o0 = row_block * kMergeTileRows, tile_k0 = col_tile * kMergeTileCols;
  const int64_t o0 = tile_o0 + warp * kRowsPerThread, k0 = tile_k0 + lane * kColsPerThread;
  T* W = static_cast<T*>(p.weight);

  bits_t w[kElements] = {};
  load_elements<T, kVec>(W, p.out, p.in, o0, k0, w);

  // The adapter d is computed from: the copy in an unmerge that has one, else lora_A / lora_B.
  const bool from_copy = kSubtract && p.adapter_copy != nullptr;
  const TW* copy = static_cast<const TW*>(p.adapter_copy);
  const TW* A = from_copy ? copy : static_cast<const TW*>(p.lora_A);
  const TW* B = from_copy ? copy + p.rank * p.in : static_cast<const TW*>(p.lora_B);
  const int64_t a_stride = from_copy ? p.in : p.a_stride, b_stride = from_copy ? p.rank : p.b_stride;
  // Merge: the blocks of the first row of tiles copy A's columns, those of the first column of tiles B's rows.
  TW* copy_A = (!kSubtract && p.adapter_copy != nullptr && row_block == 0) ? static_cast<TW*>(p.adapter_copy)
                                                                           : nullptr;
  TW* copy_B = (!kSubtract && p.adapter_copy != nullptr && col_tile == 0)
                   ? static_cast<TW*>(p.adapter_copy) + p.rank * p.in
                   : nullptr;
  const TW* now_A = static_cast<const TW*>(p.lora_A);
  const TW* now_B = static_cast<const TW*>(p.lora_B);
  bool adapter_changed = false;

  // a_tile[j][h][l] = A[j0 + j][tile_k0 + 8l + 4h .. + 4): lane l reads two consecutive float4 per rank, and
  // consecutive lanes read consecutive 16 bytes (no bank conflicts). b_tile[j][w] = B[rows 4w .. 4w+3][j0 + j].
  __shared__ float4 a_tile[kRankChunk][2][32];
  __shared__ float4 b_tile[kRankChunk][kWarps];
  float* a_flat = reinterpret_cast<float*>(a_tile);
  float* b_flat = reinterpret_cast<float*>(b_tile);
  const int a_column = threadIdx.x;  // staging: thread t loads column tile_k0 + t of A
  const int64_t a_k = tile_k0 + a_column;
  const int a_slot = (a_column % 8 / 4) * 128 + (a_column / 8) * 4 + a_column % 4;

  float d[kElements];
#pragma unroll
  for (int e = 0; e < kElements; ++e) d[e] = 0.f;
  for (int64_t j0 = 0; j0 < p.rank; j0 += kRankChunk) {
    const int chunk = static_cast<int>(p.rank - j0 < kRankChunk ? p.rank - j0 : kRankChunk);
    for (int j = 0; j < chunk; ++j) {
      float a = 0.f;  // columns past W's edge: zeros, so no NaN from stale shared memory reaches d
      if (a_k < p.in) {
        const TW value = A[(j0 + j) * a_stride + a_k];
        a = static_cast<float>(value);
        if (copy_A != nullptr) copy_A[(j0 + j) * p.in + a_k] = value;
        if (from_copy && !same_bits(value, now_A[(j0 + j) * p.a_stride + a_k])) adapter_changed = true;
      }
      a_flat[j * kMergeTileCols + a_slot] = a;
    }
    for (int e = threadIdx.x; e < kMergeTileRows * kRankChunk; e += kThreads) {
      const int i = e / kRankChunk, j = e % kRankChunk;
      const int64_t o = tile_o0 + i;
      float b = 0.f;
      if (j < chunk && o < p.out) {
        const TW value = B[o * b_stride + j0 + j];
        b = static_cast<float>(value);
        if (copy_B != nullptr) copy_B[o * p.rank + j0 + j] = value;
        if (from_copy && !same_bits(value, now_B[o * p.b_stride + j0 + j])) adapter_changed = true;
      }
      b_flat[j * kMergeTileRows + i] = b;
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < chunk; ++j) {  // ascending j, from 0: the same order in merge and unmerge
      const float4 a_lo = a_tile[j][0][lane], a_hi = a_tile[j][1][lane];
      const float4 b4 = b_tile[j][warp];
      const float a[kColsPerThread] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
      const float b[kRowsPerThread] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c)
          d[kColsPerThread * i + c] = fmaf(b[i], a[c], d[kColsPerThread * i + c]);
    }
    if (j0 + kRankChunk < p.rank) __syncthreads();  // the next chunk overwrites the tiles
  }
  if (adapter_changed) atomicOr(&p.state[2], static_cast<unsigned long long>(kAdapterChanged));

  bits_t result[kElements];
  unsigned mismatches = 0;  // bit e: element e needs a record entry
  bool became_non_finite = false, delta_non_finite = false;
#pragma unroll
  for (int e = 0; e < kElements; ++e) {
    const int i = e / kColsPerThread, c = e % kColsPerThread;
    const T original = from_bits<T>(w[e]);
    const float delta = __fmul_rn(p.scaling, d[e]);
    if (kSubtract) {
      result[e] = bits_of(static_cast<T>(__fsub_rn(static_cast<float>(original), delta)));
      continue;
    }
    const T merged = static_cast<T>(__fadd_rn(static_cast<float>(original), delta));
    const T back = static_cast<T>(__fsub_rn(static_cast<float>(merged), delta));
    result[e] = bits_of(merged);
    if (o0 + i >= p.out || k0 + c >= p.in) continue;  // outside W: no record, no flags
    if (bits_of(back) != w[e]) mismatches |= 1u << e;
    if (!isfinite(static_cast<float>(merged)) && isfinite(static_cast<float>(original))) became_non_finite = true;
    if (!isfinite(delta)) delta_non_finite = true;
  }

  if (kSubtract) {
    store_elements<T, kVec>(W, p.out, p.in, o0, k0, result);
    // The record's entries for this tile put back what the plain subtraction misses (none in a plain unmerge:
    // the tile's word is 0). Written after the block's own stores, so they win.
    const int count = tile_word == 0 ? 0 : static_cast<int>(tile_word & 0xFFFFu) - 1;
    if (count > 0) {
      __syncthreads();
      const entry_t* record = static_cast<const entry_t*>(p.record) + (tile_word >> 16);
      constexpr int kWidth = 8 * sizeof(bits_t);
      for (int e = threadIdx.x; e < count; e += kThreads) {
        const entry_t entry = record[e];
        const int local = static_cast<int>(entry >> kWidth);
        W[(tile_o0 + local / kMergeTileCols) * p.in + tile_k0 + local % kMergeTileCols] =
            from_bits<T>(static_cast<bits_t>(entry));
      }
    }
    return;
  }

  if (became_non_finite || delta_non_finite)
    atomicOr(&p.state[2], static_cast<unsigned long long>((became_non_finite ? kBecameNonFinite : 0) |
                                                          (delta_non_finite ? kDeltaNonFinite : 0)));
  // Block-wide exclusive prefix of the per-thread mismatch counts: a warp scan, then the 8 warp totals, which
  // every thread adds up itself (one __syncthreads; a second one only when the tile has entries to reserve).
  __shared__ int warp_totals[kWarps];
  __shared__ long long block_start;
  const int count = __popc(mismatches);
  int inclusive = count;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += n;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int total = 0, before = 0;
#pragma unroll
  for (int v = 0; v < kWarps; ++v) {
    const int n = warp_totals[v];
    before += v < warp ? n : 0;
    total += n;
  }
  long long start = 0;
  if (total > 0) {
    if (threadIdx.x == 0) {
      const unsigned long long slot = atomicAdd(&p.state[0], static_cast<unsigned long long>(total));
      const bool fits = slot + total <= static_cast<unsigned long long>(p.capacity);
      if (fits) atomicAdd(&p.state[1], static_cast<unsigned long long>(total));
      block_start = fits ? static_cast<long long>(slot) : -1;
    }
    __syncthreads();
    start = block_start;
    if (start < 0) return;  // no room: W untouched in this tile; the host relaunches it with a larger record
  }
  store_elements<T, kVec>(W, p.out, p.in, o0, k0, result);
  if (mismatches != 0) {
    entry_t* record = static_cast<entry_t*>(p.record);
    long long slot = start + before + inclusive - count;
    constexpr int kWidth = 8 * sizeof(bits_t);
#pragma unroll
    for (int e = 0; e < kElements; ++e) {
      if (!(mismatches & (1u << e))) continue;
      const int local = (warp * kRowsPerThread + e / kColsPerThread) * kMergeTileCols +
                        lane * kColsPerThread + e % kColsPerThread;
      record[slot++] = (static_cast<entry_t>(local) << kWidth) | static_cast<entry_t>(w[e]);
    }
  }
  if (threadIdx.x == 0)
    *tile_state = (static_cast<unsigned long long>(start) << 16) | static_cast<unsigned long long>(total + 1);
}

// merge_exact_(weight, A, B, scaling, subtract, record, state, adapter_copy): one launch over the tiles not yet
// merged (subtract=False), or the matching unmerge over all tiles (subtract=True).
void merge_exact_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                      bool subtract, at::Tensor& record, at::Tensor& state, at::Tensor& adapter_copy) {
  const char* op = "lora_ext::merge_exact_";
  check_merge_exact_inputs(weight, lora_A, lora_B, scaling, record, state, adapter_copy, op);
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
  p.adapter_copy = adapter_copy.numel() > 0 ? adapter_copy.data_ptr() : nullptr;
  p.out = weight.size(0);
  p.in = weight.size(1);
  p.rank = lora_A.size(0);
  p.scaling = static_cast<float>(scaling);
  p.record = record.data_ptr();
  p.capacity = record.numel();
  p.state = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
  const int64_t tiles = merge_exact_tiles(p.out, p.in);
  // 16-byte accesses need every row of W to start on a 16-byte boundary.
  const bool vectorised = reinterpret_cast<uintptr_t>(p.weight) % 16 == 0 && (p.in * weight.element_size()) % 16 == 0;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_activation_and_adapter(weight.scalar_type(), lora_A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
    using T = decltype(act_tag);
    using TW = decltype(adapter_tag);
    auto launch = [&](auto vec, auto sub) {
      exact_merge_kernel<T, TW, decltype(vec)::value, decltype(sub)::value>
          <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p);
    };
    if (vectorised) {
      if (subtract) launch(std::true_type{}, std::true_type{}); else launch(std::true_type{}, std::false_type{});
    } else {
      if (subtract) launch(std::false_type{}, std::true_type{}); else launch(std::false_type{}, std::false_type{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("merge_exact_", &merge_exact_cuda); }

}  // namespace cuda
}  // namespace lora_ext
