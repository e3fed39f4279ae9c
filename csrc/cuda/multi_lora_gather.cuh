// multi_lora_forward's low-rank term for few tokens, each with its own adapter (Punica's BGMV shape: decoding).
//
// Two launches that share one float32 workspace with the tile kernels (multi_lora_tiles.cuh):
//   partial[split][t][j] = Σ_{k in split} x[t, k]·A[a][j, k]     (a = the slot of token t; zeros for base rows)
//   y[t, o] = round(y[t, o] + s[a]·Σ_j xa[t, j]·B[a][o, j]),   xa[t, j] = Σ_split partial[split][t][j]
// The in-dimension is split across blocks so that 32 tokens still fill the GPU; the splits are added in a fixed
// order by the expand (no atomics: repeated runs give the same bits, and no memset launch is needed).
//
// Shrink grid: (tokens, k-splits), 64 threads; a thread reads 8 consecutive k of x[t] and of each of A[a]'s
// rows with 16-byte loads (32-byte for float32), so a block moves r·(in/splits) adapter elements from L2 or HBM;
// every adapter a token names is read once per token (A[a] is re-read from L2 by tokens sharing a slot: at ≤ 64
// tokens that is cheaper than grouping them, which would need a sort or a sync).
// Expand grid: (tokens, out / 1024), 128 threads, each 8 output columns: reads B[a]'s 8 rows of r elements and
// one 16-byte vector of y. Bytes: B[a] once per token, y read and written once.
// Needs in % 8 == 0, out % 8 == 0, 16-byte aligned x rows (unit column stride), stacks and y, r_max ≤ 64;
// multi_lora.cu falls back to its general kernels otherwise.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {

struct MultiLoraParams {
  const void* x;  // (tokens, in), unit column stride
  int64_t x_stride;
  const void* lora_A;  // (adapters, rank, in), contiguous
  const void* lora_B;  // (adapters, out, rank), contiguous
  const float* scalings;  // (adapters,)
  const void* ids;  // (tokens,), int32 or int64
  void* y;  // (tokens, out), contiguous, holds x·Wᵀ + b on entry
  float* partial;  // (splits, tokens, rank): the shrink's partial sums over the in-dimension
  int64_t tokens, in, out, adapters, rank;
  int64_t splits;
  int64_t split_size;  // per k-split: 8-vectors of the in-dimension (gather) or 64-wide chunks (tiles)
  bool dependent_launch;  // the cluster kernel was launched as the base GEMM's programmatic dependent
  // The fused GEMM's row pairs (multi_lora_pair_passes_kernel): the tile expand skips pairs whose terms the GEMM
  // added.
  const int32_t* pair_passes;
  int expand_column_tiles;  // the tile expand's 64-column tiles per block (0 counts as 1)
  // The decoding cluster kernel with IdT = OneAdapter (single-adapter decoding, forward.cu): no ids and no scalings
  // tensor; every token on slot 0 with this scaling, and x·Aᵀ written out (tokens × rank, float32) for backward.
  float one_adapter_scaling;
  float* lora_activation;
};

constexpr int kNoSlot = INT_MAX;

// The slot of token t, or -1 for the base layer alone (ids outside [-1, n): checking them would need a sync).
template <typename IdT>
__device__ __forceinline__ int slot_of(const void* ids, int64_t t, int64_t adapters) {
  const int64_t a = static_cast<int64_t>(static_cast<const IdT*>(ids)[t]);
  return (a >= 0 && a < adapters) ? static_cast<int>(a) : -1;
}

// The id type of a batch on one adapter (launch_one_adapter_decode in multi_lora.cu): every token is on slot 0.
struct OneAdapter {};
template <>
__device__ __forceinline__ int slot_of<OneAdapter>(const void*, int64_t, int64_t) {
  return 0;
}

// The smallest slot in slots[0, count) above `after`, or kNoSlot: a block walks the distinct adapters of its
// tile in increasing order with it (count ≤ 64 reads of shared memory; every thread gets the same answer).
__device__ __forceinline__ int next_slot(const int* slots, int count, int after) {
  int best = kNoSlot;
  for (int i = 0; i < count; ++i) {
    const int a = slots[i];
    if (a > after && a < best) best = a;
  }
  return best;
}

template <typename S>
__device__ __forceinline__ void store8_float(S* dst, const float v[8]) {
  if constexpr (std::is_same_v<S, float>) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    Pack8<S> pack;
#pragma unroll
    for (int q = 0; q < 8; ++q) pack.v[q] = S(v[q]);
    *reinterpret_cast<uint4*>(dst) = pack.bits;
  }
}

constexpr int kGatherShrinkThreads = 64;
constexpr int kGatherExpandThreads = 128;
constexpr int kGatherExpandColumns = 8 * kGatherExpandThreads;  // output columns per block

// acc[j] += Σ x[t, k]·A[a][j, k] over the 8-vectors v_begin + first, v_begin + first + step, … < v_end.
template <typename T, typename TW, int RPAD>
__device__ __forceinline__ void gather_shrink_range(float (&acc)[RPAD], const T* xt, const TW* At, int64_t rank,
                                                    int64_t in, int64_t v_begin, int64_t v_end, int first, int step) {
  for (int64_t v = v_begin + first; v < v_end; v += step) {
    float xv[8];
    load8_float(xt + 8 * v, xv);
#pragma unroll
    for (int j = 0; j < RPAD; ++j) {
      if (j < rank) {
        float av[8];
        load8_float(At + j * in + 8 * v, av);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[j] = fmaf(xv[q], av[q], acc[j]);
      }
    }
  }
}

// The block's sum of acc (every thread's), rank by rank, in a fixed order (warp butterflies, then warps in order);
// returned through `sums` (RPAD floats of shared memory) after a __syncthreads.
template <int RPAD, int kWarps>
__device__ __forceinline__ void block_sum_ranks(const float (&acc)[RPAD], float (&warp_sums)[kWarps][RPAD],
                                                float* sums, int64_t rank) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < RPAD; ++j) {
    float v = acc[j];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][j] = v;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < rank; j += kWarps * 32) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][j];
    sums[j] = sum;
  }
}

// y[t, o … o+7] = round(y + round(s·Σ_j xa[j]·B[a][o + q, j])): s·Σ rounded, then added and rounded once into y's
// dtype, as the CPU kernel does (no FMA contraction). yv holds y's 8 values, loaded by the caller early.
template <typename T, typename TW, int RPAD, bool RANK_VECTORS>
__device__ __forceinline__ void gather_expand_8(T* yo, float (&yv)[8], const TW* Bo, const float* xa, int64_t rank,
                                                float s) {
  float acc[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    acc[q] = 0.f;
    if constexpr (RANK_VECTORS) {
#pragma unroll
      for (int j0 = 0; j0 < RPAD; j0 += 8) {
        if (j0 < rank) {
          float bv[8];
          load8_float(Bo + q * rank + j0, bv);
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) acc[q] = fmaf(xa[j0 + jj], bv[jj], acc[q]);
        }
      }
    } else {
      for (int64_t j = 0; j < rank; ++j) acc[q] = fmaf(xa[j], static_cast<float>(Bo[q * rank + j]), acc[q]);
    }
  }
#pragma unroll
  for (int q = 0; q < 8; ++q) yv[q] = __fadd_rn(yv[q], __fmul_rn(s, acc[q]));
  store8_float(yo, yv);
}

template <typename T, typename TW, typename IdT, int RPAD>
__global__ void __launch_bounds__(kGatherShrinkThreads) multi_lora_gather_shrink_kernel(const MultiLoraParams p) {
  constexpr int kWarps = kGatherShrinkThreads / 32;
  const int64_t t = blockIdx.x, split = blockIdx.y;
  float* out = p.partial + (split * p.tokens + t) * p.rank;
  const int a = slot_of<IdT>(p.ids, t, p.adapters);
  if (a < 0) {
    for (int64_t j = threadIdx.x; j < p.rank; j += kGatherShrinkThreads) out[j] = 0.f;
    return;
  }
  const T* xt = static_cast<const T*>(p.x) + t * p.x_stride;
  const TW* At = static_cast<const TW*>(p.lora_A) + static_cast<int64_t>(a) * p.rank * p.in;
  const int64_t v_begin = split * p.split_size, v_end = min(p.in / 8, v_begin + p.split_size);
  float acc[RPAD];
#pragma unroll
  for (int j = 0; j < RPAD; ++j) acc[j] = 0.f;
  gather_shrink_range<T, TW, RPAD>(acc, xt, At, p.rank, p.in, v_begin, v_end, threadIdx.x, kGatherShrinkThreads);
  __shared__ float warp_sums[kWarps][RPAD];
  block_sum_ranks<RPAD, kWarps>(acc, warp_sums, out, p.rank);
}

template <typename T, typename TW, typename IdT, int RPAD, bool RANK_VECTORS>
__global__ void __launch_bounds__(kGatherExpandThreads) multi_lora_gather_expand_kernel(const MultiLoraParams p) {
  const int64_t t = blockIdx.x;
  const int a = slot_of<IdT>(p.ids, t, p.adapters);
  if (a < 0) return;
  // y's 8 values are loaded first, so their latency overlaps the split sums and B's loads.
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kGatherExpandColumns + 8 * threadIdx.x;
  T* yo = static_cast<T*>(p.y) + t * p.out + o;
  float yv[8];
  if (o < p.out) load8_float(yo, yv);
  __shared__ float xa[RPAD];
  for (int j = threadIdx.x; j < RPAD; j += kGatherExpandThreads) {
    float sum = 0.f;
    if (j < p.rank) {
#pragma unroll 4
      for (int64_t s = 0; s < p.splits; ++s) sum += p.partial[(s * p.tokens + t) * p.rank + j];
    }
    xa[j] = sum;
  }
  __syncthreads();
  if (o >= p.out) return;
  const TW* Bo = static_cast<const TW*>(p.lora_B) + (static_cast<int64_t>(a) * p.out + o) * p.rank;
  gather_expand_8<T, TW, RPAD, RANK_VECTORS>(yo, yv, Bo, xa, p.rank, p.scalings[a]);
}

}  // namespace cuda
}  // namespace lora_ext
