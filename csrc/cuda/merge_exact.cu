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
// 32 rows). The kernel is bound by instruction issue and latency, not by DRAM (an H100 ran the previous version,
// 124 registers and ≈ 2660 instructions per thread, at 18% of DRAM bandwidth), so the design counts
// instructions and registers:
//   * W's elements are requested first, so they are in flight while the adapter is staged and d computed. For a
//     16-bit W with 16-byte rows they go through cp.async into shared memory (no registers held meanwhile), so
//     the 16-bit kernels fit in 80 registers: 3 blocks (24 warps) per SM. float32 W loads into registers (128
//     registers, 2 blocks/SM); the scalar path (kVec = false, 16-bit) loads after the FMAs.
//   * d for 4 rows × 8 columns is a register tile: per rank j, 2 float4 of A and 1 float4 of B from shared
//     memory feed 32 FMAs (the FMAs, r per element, are the kernel's arithmetic floor: 512 per thread at r = 16).
//     For r ≤ 16 (one chunk) the rank loop is fully unrolled, straight-line code with immediate shared-memory
//     offsets; larger ranks loop over chunks of 16.
//   * A and B are staged as float (no conversion inside the FMA loop), 16 ranks at a time, one __syncthreads for
//     r ≤ 16; the staging stores are free of bank conflicts (a swizzled A layout, a padded B layout). Copying
//     the adapter (the merge's first row / column of tiles) and comparing it (the unmerge from a copy) take a
//     separate staging path, so the common one only loads, converts and stores.
//   * Indices inside the tile are 32-bit; only the tile's and the thread's base pointers are 64-bit.
//   * The epilogue works on words of two 16-bit elements: one F2FP rounds two values (the same rounding as
//     static_cast<T>(float)), and the record question "round(round(w + δ) − δ) != w?" is first asked of whole
//     words (x = back ^ w, OR-ed together). NaN/Inf checks are a probe, probe = fma(δ, 0, probe), NaN iff some δ
//     is NaN/Inf; a finite w that becomes NaN/Inf always mismatches, so kBecameNonFinite is looked for only
//     where x != 0. Only then (rare) does the thread look at single elements.
//   * the merge reserves its tile's record slots with one atomicAdd per block, and only when the tile has
//     mismatches (one __syncthreads_or tells the block; most tiles in low-rank merges have none); the unmerge
//     applies its tile's entries itself, after its stores, instead of a separate scatter kernel over W.
// When W's rows are not 16-byte aligned (a view, or in_features not a multiple of 8 / 4) the same kernel runs
// with one scalar access per element (kVec = false): same arithmetic, same bits.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../merge_exact_layout.h"
#include "async_copy.cuh"
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
  int tiles_per_row;  // ceil(in / kMergeTileCols): the grid is row-major over tiles (fits: tiles <= INT32_MAX)
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

template <typename TW>
__device__ __forceinline__ bool same_bits(TW a, TW b) {
  return bits_of(a) == bits_of(b);
}

// W's elements travel as 32-bit words: two 16-bit elements per word (element 2k in the low half of word k, as in
// memory), or one float32. A thread's element e = 8·i + c (row i, column c of its 4 × 8) is in word
// e / kPerWord.
template <typename T>
constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
template <typename T>
constexpr int kWords = kElements / kPerWord<T>;  // 16, or 32 for float32

// The exact value (as float) of the 16-bit element in the low / high half of a word.
template <typename T>
__device__ __forceinline__ float low_to_float(uint32_t word) {
  if constexpr (std::is_same_v<T, at::BFloat16>) return __uint_as_float(word << 16);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xFFFFu)));
}
template <typename T>
__device__ __forceinline__ float high_to_float(uint32_t word) {
  if constexpr (std::is_same_v<T, at::BFloat16>) return __uint_as_float(word & 0xFFFF0000u);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
}
// round(low), round(high) to T (round to nearest even, as static_cast<T>(float) on the device: one F2FP
// instruction converts both), packed into one word.
template <typename T>
__device__ __forceinline__ uint32_t round_pair(float low, float high) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(low, high);
    uint32_t word;
    memcpy(&word, &v, sizeof(word));
    return word;
  } else {
    const __half2 v = __floats2half2_rn(low, high);
    uint32_t word;
    memcpy(&word, &v, sizeof(word));
    return word;
  }
}

// Element e's bits, from the words.
template <typename T>
__device__ __forceinline__ typename Bits<T>::type element_bits(const uint32_t (&words)[kWords<T>], int e) {
  if constexpr (sizeof(T) == 4) return words[e];
  else return static_cast<uint16_t>(words[e / 2] >> (16 * (e % 2)));
}
// isfinite of the value, from its bits (all exponent bits set: Inf or NaN). On the bits rather than on the float
// value so that nvcc does not keep the fast path's unpacked floats alive for the rare path.
template <typename T>
__device__ __forceinline__ bool finite_bits(typename Bits<T>::type b) {
  constexpr uint32_t kExponent = sizeof(T) == 4 ? 0x7F800000u : std::is_same_v<T, at::BFloat16> ? 0x7F80u : 0x7C00u;
  return (b & kExponent) != kExponent;
}
// A thread's 4 × 8 elements of W as words (row i in words kWords / 4 · i ..); row points at the thread's first
// element, rows_left / cols_left say how many of its rows / columns are inside W (elements outside are neither
// read nor written: their words stay 0).
template <typename T, bool kVec>
__device__ __forceinline__ void load_words(const T* row, int64_t in, int rows_left, int cols_left,
                                           uint32_t (&w)[kWords<T>]) {
  constexpr int kPerVec = 16 / sizeof(T), kRowWords = kWords<T> / kRowsPerThread;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i, row += in) {
    if (i >= rows_left) continue;
#pragma unroll
    for (int v = 0; v < kColsPerThread / kPerVec; ++v) {
      if constexpr (kVec) {  // in % kPerVec == 0: a vector is wholly inside W or wholly outside
        if (v * kPerVec < cols_left) {
          const uint4 q = __ldcs(reinterpret_cast<const uint4*>(row + v * kPerVec));  // W is read once
          memcpy(&w[kRowWords * i + 4 * v], &q, sizeof(q));
        }
      } else {
#pragma unroll
        for (int c = v * kPerVec; c < (v + 1) * kPerVec; ++c) {
          if (c >= cols_left) continue;
          const uint32_t b = bits_of(row[c]);
          const int e = kColsPerThread * i + c;
          w[e / kPerWord<T>] |= b << (8 * sizeof(T) * (e % kPerWord<T>));
        }
      }
    }
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void store_words(T* row, int64_t in, int rows_left, int cols_left,
                                            const uint32_t (&w)[kWords<T>]) {
  constexpr int kPerVec = 16 / sizeof(T), kRowWords = kWords<T> / kRowsPerThread;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i, row += in) {
    if (i >= rows_left) continue;
#pragma unroll
    for (int v = 0; v < kColsPerThread / kPerVec; ++v) {
      if constexpr (kVec) {
        if (v * kPerVec < cols_left) {
          uint4 q;
          memcpy(&q, &w[kRowWords * i + 4 * v], sizeof(q));
          __stcs(reinterpret_cast<uint4*>(row + v * kPerVec), q);
        }
      } else {
#pragma unroll
        for (int c = v * kPerVec; c < (v + 1) * kPerVec; ++c)
          if (c < cols_left) row[c] = from_bits<T>(element_bits<T>(w, kColsPerThread * i + c));
      }
    }
  }
}

// Shared memory per rank chunk. a_s[j]: A's 256 columns of the tile as float, in the order the FMA loop reads them
// (lane l: columns 8l .. 8l+3 as the float4 at 4l, columns 8l+4 .. 8l+7 as the float4 at 128 + 4·(l ^ 4); the
// "^ 4" swizzle makes the staging stores, one column per thread, hit 32 different banks per warp).
// b_s[j]: B's 32 rows of the tile at rank j0 + j, rows 4w .. 4w+3 as the float4 at 4w (row pitch kBPitch = 36
// floats, so the staging stores of a warp, 4 rows × 8 ranks, hit 32 different banks).
constexpr int kBPitch = kMergeTileRows + 4;
__device__ __forceinline__ int a_slot(int column) {  // where column (0..255) of the tile lives in a_s[j]
  const int l = column / 8, h = column % 8 / 4, q = column % 4;
  return h * 128 + 4 * (l ^ (4 * h)) + q;
}

template <typename T, typename TW, bool kVec, bool kSubtract>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 2 ? 3 : 2) exact_merge_kernel(const ExactMergeParams p) {
  using bits_t = typename Bits<T>::type;
  using entry_t = typename Bits<T>::entry;
  constexpr int kW = kWords<T>;
  const unsigned tile = blockIdx.x;
  const unsigned row_block = tile / static_cast<unsigned>(p.tiles_per_row);
  const unsigned col_tile = tile - row_block * static_cast<unsigned>(p.tiles_per_row);
  unsigned long long* tile_state = p.state + kMergeStateHeader + tile;
  const unsigned long long tile_word = *tile_state;
  if (!kSubtract && tile_word != 0) return;  // merged by an earlier launch
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // 64-bit arithmetic for the tile's place in W only; inside the tile everything is int.
  const int64_t tile_o0 = static_cast<int64_t>(row_block) * kMergeTileRows;
  const int64_t tile_k0 = static_cast<int64_t>(col_tile) * kMergeTileCols;
  const int tile_rows = static_cast<int>(p.out - tile_o0 < kMergeTileRows ? p.out - tile_o0 : kMergeTileRows);
  const int tile_cols = static_cast<int>(p.in - tile_k0 < kMergeTileCols ? p.in - tile_k0 : kMergeTileCols);
  const int r0 = warp * kRowsPerThread, c0 = lane * kColsPerThread;  // the thread's first element in the tile
  T* const W_tile = static_cast<T*>(p.weight) + tile_o0 * p.in + tile_k0;
  T* const W_thread = W_tile + r0 * p.in + c0;

  // W's elements are requested first, so that their latency overlaps the staging and the FMAs. 16-bit W with
  // 16-byte rows: cp.async into shared memory (w_s: the thread's row i at w_s[i·256 + t]; no registers held
  // meanwhile, which keeps the kernel at 80 registers, 3 blocks/SM). float32 W: straight into registers (the
  // kernel has 128 registers there). 16-bit W without 16-byte rows (the scalar path): loaded after the FMAs.
  constexpr bool kStageW = kVec && sizeof(T) == 2, kEarlyW = sizeof(T) == 4;
  __shared__ __align__(16) uint4 w_s[kStageW ? kRowsPerThread * kThreads : 1];
  uint32_t w[kW];
#pragma unroll
  for (int k = 0; k < kW; ++k) w[k] = 0;
  if constexpr (kStageW) {
    if (c0 < tile_cols) {  // 8 | in: the thread's 8 columns are wholly inside W or wholly outside
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
        if (r0 + i < tile_rows) copy_16_bytes_async(&w_s[i * kThreads + threadIdx.x], W_thread + i * p.in);
    }
    copy_async_commit();
  } else if constexpr (kEarlyW) {
    load_words<T, kVec>(W_thread, p.in, tile_rows - r0, tile_cols - c0, w);
  }

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
  // Staging: thread t loads column t of the tile from A (one element per rank), and rows 4w + l % 4 of B at
  // ranks l / 4 and l / 4 + 8 (w = warp, l = lane).
  const int t = threadIdx.x;
  const bool a_inside = t < tile_cols;
  const int b_row = r0 + lane % 4, b_rank = lane / 4;
  const bool b_inside = b_row < tile_rows;
  const TW* A_column = A + tile_k0 + t;
  const TW* B_row = B + (tile_o0 + b_row) * b_stride;
  // Copies and comparisons (the merge's first row / column of tiles, the unmerge from a copy) take a slower
  // staging path with 64-bit indices; everything else loads and converts only.
  const bool extra = copy_A != nullptr || copy_B != nullptr || from_copy;
  bool adapter_changed = false;

  __shared__ __align__(16) float a_s[kRankChunk * kMergeTileCols];
  __shared__ __align__(16) float b_s[kRankChunk * kBPitch];
  float* const a_store = a_s + a_slot(t);
  float* const b_store = b_s + b_rank * kBPitch + b_row;
  const float* const a_lo = a_s + 4 * lane;
  const float* const a_hi = a_s + 128 + 4 * (lane ^ 4);
  const float* const b_load = b_s + r0;

  float d[kElements];
#pragma unroll
  for (int e = 0; e < kElements; ++e) d[e] = 0.f;
  // ascending j, from 0: the same order in merge and unmerge
  auto rank_step = [&](int j) {
    const float4 al = *reinterpret_cast<const float4*>(a_lo + j * kMergeTileCols);
    const float4 ah = *reinterpret_cast<const float4*>(a_hi + j * kMergeTileCols);
    const float4 b4 = *reinterpret_cast<const float4*>(b_load + j * kBPitch);
    const float a[kColsPerThread] = {al.x, al.y, al.z, al.w, ah.x, ah.y, ah.z, ah.w};
    const float b[kRowsPerThread] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c)
        d[kColsPerThread * i + c] = fmaf(b[i], a[c], d[kColsPerThread * i + c]);
  };
  // One chunk of ranks: stage A's and B's slices in a_s / b_s, then the FMAs.
  auto chunk_pass = [&](int j0, int chunk) {
    // Outside W: zeros, so no NaN from stale shared memory reaches d.
    if (!extra) {
      const TW* src = A_column + j0 * a_stride;
      if (!a_inside) {
        for (int j = 0; j < chunk; ++j) a_store[j * kMergeTileCols] = 0.f;
      } else if (chunk == kRankChunk) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // 8 loads in flight, then their stores
          float a[kRankChunk / 2];
#pragma unroll
          for (int j = 0; j < kRankChunk / 2; ++j) a[j] = static_cast<float>(src[j * a_stride]);
#pragma unroll
          for (int j = 0; j < kRankChunk / 2; ++j) a_store[(8 * half + j) * kMergeTileCols] = a[j];
          src += kRankChunk / 2 * a_stride;
        }
      } else {
#pragma unroll 4
        for (int j = 0; j < chunk; ++j) a_store[j * kMergeTileCols] = static_cast<float>(src[j * a_stride]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = b_rank + 8 * h;
        b_store[8 * h * kBPitch] = (b_inside && j < chunk) ? static_cast<float>(B_row[j0 + j]) : 0.f;
      }
    } else {
      for (int j = 0; j < chunk; ++j) {
        float a = 0.f;
        if (a_inside) {
          const int64_t rank_j = j0 + j;
          const TW value = A_column[rank_j * a_stride];
          a = static_cast<float>(value);
          if (copy_A != nullptr) copy_A[rank_j * p.in + tile_k0 + t] = value;
          if (from_copy && !same_bits(value, now_A[rank_j * p.a_stride + tile_k0 + t])) adapter_changed = true;
        }
        a_store[j * kMergeTileCols] = a;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = b_rank + 8 * h;
        float b = 0.f;
        if (b_inside && j < chunk) {
          const int64_t o = tile_o0 + b_row, rank_j = j0 + j;
          const TW value = B_row[rank_j];
          b = static_cast<float>(value);
          if (copy_B != nullptr) copy_B[o * p.rank + rank_j] = value;
          if (from_copy && !same_bits(value, now_B[o * p.b_stride + rank_j])) adapter_changed = true;
        }
        b_store[8 * h * kBPitch] = b;
      }
    }
    __syncthreads();
    if (chunk == kRankChunk) {
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) rank_step(j);
    } else {
#pragma unroll 4
      for (int j = 0; j < chunk; ++j) rank_step(j);
    }
  };
  const int rank = static_cast<int>(p.rank);
  if (rank <= kRankChunk) {  // the common case, straight-line: no pointer stays live across chunks
    chunk_pass(0, rank);
  } else {
    for (int j0 = 0; j0 < rank; j0 += kRankChunk) {
      if (j0 > 0) __syncthreads();  // every thread is done with the previous chunk's a_s / b_s
      chunk_pass(j0, rank - j0 < kRankChunk ? rank - j0 : kRankChunk);
    }
  }
  if (adapter_changed) atomicOr(&p.state[2], static_cast<unsigned long long>(kAdapterChanged));
  if constexpr (kStageW) {
    copy_async_wait_all();  // the thread reads back only what it copied itself: no barrier needed
    if (c0 < tile_cols) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
        if (r0 + i < tile_rows) memcpy(&w[4 * i], &w_s[i * kThreads + threadIdx.x], 16);
    }
  } else if constexpr (!kEarlyW) {
    load_words<T, kVec>(W_thread, p.in, tile_rows - r0, tile_cols - c0, w);
  }

  // delta = s·d, merged = round(w + delta) (the new W), back = round(merged − delta) (what the unmerge will
  // compute); element e needs a record entry where back != w. A thread whose 32 elements all lie inside W (all but
  // those at W's last row / column block) decides on whole words: x = back ^ w, one F2FP rounds two elements, and
  // the common case is x == 0 everywhere and no NaN/Inf delta: probe = fma(delta, 0, probe) stays 0 unless some
  // delta is NaN/Inf (then it is NaN; IEEE arithmetic, no fast-math, so nvcc cannot fold it). A finite w whose
  // merged value is NaN/Inf comes back NaN/Inf, i.e. mismatches: kBecameNonFinite needs a look only when x != 0.
  // Elements outside W are computed too (never stored) but give no record entry and no flag.
  const float s = p.scaling;
  uint32_t result[kW];
  unsigned mismatches = 0;  // bit e: element e needs a record entry
  bool became_non_finite = false, delta_non_finite = false;
  if (kSubtract) {
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      if constexpr (sizeof(T) == 2) {
        const float delta_lo = __fmul_rn(s, d[2 * k]), delta_hi = __fmul_rn(s, d[2 * k + 1]);
        result[k] = round_pair<T>(__fsub_rn(low_to_float<T>(w[k]), delta_lo),
                                  __fsub_rn(high_to_float<T>(w[k]), delta_hi));
      } else {
        result[k] = __float_as_uint(__fsub_rn(__uint_as_float(w[k]), __fmul_rn(s, d[k])));
      }
    }
  } else {
    // Threads at W's edge first take their probe over their elements inside W only: an element outside W has
    // d = 0·Inf = NaN when the adapter holds Inf (A and B are staged as 0 outside W).
    const bool edge = tile_rows - r0 < kRowsPerThread || tile_cols - c0 < kColsPerThread;
    float probe = 0.f, probe_all = 0.f;
    if (edge) {
#pragma unroll
      for (int e = 0; e < kElements; ++e)
        if (r0 + e / kColsPerThread < tile_rows && c0 + e % kColsPerThread < tile_cols)
          probe = __fmaf_rn(__fmul_rn(s, d[e]), 0.f, probe);
    }
    uint32_t x[kW], diff = 0;  // x: back ^ w
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      if constexpr (sizeof(T) == 2) {
        const float delta_lo = __fmul_rn(s, d[2 * k]), delta_hi = __fmul_rn(s, d[2 * k + 1]);
        probe_all = __fmaf_rn(delta_lo, 0.f, probe_all);
        probe_all = __fmaf_rn(delta_hi, 0.f, probe_all);
        const uint32_t merged = round_pair<T>(__fadd_rn(low_to_float<T>(w[k]), delta_lo),
                                              __fadd_rn(high_to_float<T>(w[k]), delta_hi));
        const uint32_t back = round_pair<T>(__fsub_rn(low_to_float<T>(merged), delta_lo),
                                            __fsub_rn(high_to_float<T>(merged), delta_hi));
        result[k] = merged;
        x[k] = back ^ w[k];
      } else {
        const float delta = __fmul_rn(s, d[k]);
        probe_all = __fmaf_rn(delta, 0.f, probe_all);
        const float merged = __fadd_rn(__uint_as_float(w[k]), delta);
        result[k] = __float_as_uint(merged);
        x[k] = __float_as_uint(__fsub_rn(merged, delta)) ^ w[k];
      }
      diff |= x[k];
    }
    if (!edge) probe = probe_all;
    delta_non_finite = probe != 0.f;
    if (diff != 0) {  // rare: which elements (inside W) mismatch, and did a finite one become NaN/Inf?
#pragma unroll
      for (int e = 0; e < kElements; ++e) {
        if (r0 + e / kColsPerThread >= tile_rows || c0 + e % kColsPerThread >= tile_cols) continue;
        if (element_bits<T>(x, e) == 0) continue;
        mismatches |= 1u << e;
        if (!finite_bits<T>(element_bits<T>(result, e)) && finite_bits<T>(element_bits<T>(w, e)))
          became_non_finite = true;
      }
    }
  }

  if (kSubtract) {
    store_words<T, kVec>(W_thread, p.in, tile_rows - r0, tile_cols - c0, result);
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
        W_tile[(local / kMergeTileCols) * p.in + local % kMergeTileCols] = from_bits<T>(static_cast<bits_t>(entry));
      }
    }
    return;
  }

  if (became_non_finite || delta_non_finite)
    atomicOr(&p.state[2], static_cast<unsigned long long>((became_non_finite ? kBecameNonFinite : 0) |
                                                          (delta_non_finite ? kDeltaNonFinite : 0)));

  // The tile's record entries: none in the common case (one barrier tells the whole block). Otherwise a
  // block-wide exclusive prefix of the per-thread counts: a warp scan, then the 8 warp totals, which every thread
  // adds up itself, and one atomicAdd for the tile's slots.
  __shared__ int warp_totals[kWarps];
  __shared__ long long block_start;
  const int count = __popc(mismatches);
  int before = 0, total = 0;
  long long start = 0;
  if (__syncthreads_or(mismatches != 0)) {
    int inclusive = count;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const int n = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += n;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
#pragma unroll
    for (int v = 0; v < kWarps; ++v) {
      const int n = warp_totals[v];
      before += v < warp ? n : 0;
      total += n;
    }
    before += inclusive - count;
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
  store_words<T, kVec>(W_thread, p.in, tile_rows - r0, tile_cols - c0, result);
  if (mismatches != 0) {
    entry_t* record = static_cast<entry_t*>(p.record);
    long long slot = start + before;
    constexpr int kWidth = 8 * sizeof(bits_t);
#pragma unroll
    for (int e = 0; e < kElements; ++e) {
      if (!(mismatches & (1u << e))) continue;
      const int local = (r0 + e / kColsPerThread) * kMergeTileCols + c0 + e % kColsPerThread;
      record[slot++] = (static_cast<entry_t>(local) << kWidth) | static_cast<entry_t>(element_bits<T>(w, e));
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
  const int64_t tiles = merge_exact_tiles(p.out, p.in);  // <= INT32_MAX (check_merge_exact_inputs)
  p.tiles_per_row = static_cast<int>((p.in + kMergeTileCols - 1) / kMergeTileCols);
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
