// multi_lora_forward's low-rank term for runs of tokens sharing an adapter (Punica's SGMV shape: prefill), on
// tensor cores (16×16×16 bf16/fp16 WMMA, float32 accumulators). The same workspace as the gather kernels
// (multi_lora_gather.cuh): partial[split][t][j], added over the splits in a fixed order by the expand.
//
// Neither kernel needs the tokens sorted or any host-side metadata: each block reads the ids of its own tile,
// and walks the distinct slots among them in increasing order (next_slot; usually one, two where a tile
// straddles the boundary of two runs, none for a tile of base rows, which costs nothing then).
//
// Shrink: grid (tokens / 16, k-splits), 4 warps that split the block's share of the in-dimension (as
// lora_shrink.cuh's kernel, whose tiles and pitches it reuses). Per distinct slot a of the tile: each warp
// stages its 16 × 64 tile of x (16-byte loads, the next chunk's loads issued before this chunk's MMAs) and
// A[a]'s r × 64 slice, MMAs into float32, the warps' sums are added in a fixed order, and the rows of the tile
// whose slot is a are written. The MMA covers all 16 rows (tensor cores make the unused rows free) and no row is
// read for another slot's result, so a NaN in one adapter stays in its rows. Bytes: x once per (tile, distinct
// slot), i.e. once for a tile of one run; A[a] once per block from L2; partial 4·r bytes per row and split.
// Splitting the in-dimension keeps ≥ 2 blocks per SM at a few hundred tokens.
//
// Expand: grid (tokens / 64, out / 64), 4 warps of 16 rows × 64 columns (as lora_expand_wmma.cuh). The block
// loads its y tile first, stages xa (the splits added, rounded to the MMA type as the single-adapter path does)
// once, then per distinct slot a stages B[a]'s 64 × r slice, MMAs, and keeps s[a]·product for the rows of slot a
// in registers; y is written once, with one rounding of y + s·Σ. Bytes: y read and written once (rows of the
// base layer are not written), B[a] once per (tile, distinct slot) from L2.
//
// Needs 16-bit x, in % 8 == 0, out % 8 == 0, r_max % 8 == 0 and ≤ 64, 16-byte aligned rows; multi_lora.cu
// picks the gather or the general kernels otherwise.
#pragma once

#include <ATen/ATen.h>
#include <mma.h>

#include "lora_expand_wmma.cuh"
#include "lora_gemm_sm90.h"
#include "lora_shrink.cuh"
#include "multi_lora_gather.cuh"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {

constexpr int kTileShrinkRows = 16;
constexpr int kTileExpandRows = expand_wmma_detail::kTile;
constexpr int kTileExpandColumns = expand_wmma_detail::kTile;

template <typename T, typename TW, typename IdT, int RPAD>
__global__ void __launch_bounds__(128) multi_lora_tile_shrink_kernel(const MultiLoraParams p) {
  using namespace shrink_detail;
  using namespace nvcuda;
  using MmaT = typename WmmaType<T>::type;
  if constexpr (!WmmaType<T>::kCompiled) __trap();  // never launched there (wmma_dtype_usable)
  static_assert(RPAD % 16 == 0 && RPAD <= 64, "RPAD must be 16, 32, 48 or 64");
  wait_for_preceding_kernel();  // launched as a programmatic dependent (dependent_launch.h): nothing read before
  __shared__ __align__(32) T x_tile[kWarps][16][kPitch];
  __shared__ __align__(32) T w_tile[kWarps][RPAD][kPitch];
  __shared__ int row_slot[kTileShrinkRows];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileShrinkRows;
  const int64_t chunks = (p.in + kTileK - 1) / kTileK;
  const int64_t split_begin = blockIdx.y * p.split_size, split_end = min(chunks, split_begin + p.split_size);
  const int64_t chunk_begin = split_begin + (split_end - split_begin) * warp / kWarps;
  const int64_t chunk_end = split_begin + (split_end - split_begin) * (warp + 1) / kWarps;
  const T* x = static_cast<const T*>(p.x);
  float* out = p.partial + blockIdx.y * p.tokens * p.rank;

  // x: 16 rows × 8 vectors of 8 elements per chunk, four per lane; A[a]: RPAD rows × 64 columns, RPAD / 4 per
  // lane. Both are prefetched one chunk ahead (A comes from L2 on every chunk; waited for inside the loop it
  // halved the single-adapter shrink's bandwidth), and the first x chunk goes out before the tile's ids are read:
  // every slot's pass starts with the same x chunk.
  uint4 x_next[4];
  auto load_x = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
      const int64_t col = k0 + c, row = row0 + r;
      x_next[i] = (col < p.in && row < p.tokens) ? *reinterpret_cast<const uint4*>(x + row * p.x_stride + col)
                                                 : make_uint4(0, 0, 0, 0);
    }
  };
  // The A prefetch holds RPAD / 4 more 16-byte registers per lane: r ≤ 16 only (at RPAD = 32 and 64 it spills or
  // halves the blocks per SM; those ranks load A inside the loop, as before).
  constexpr bool kPrefetchW = RPAD <= 16;
  constexpr int kWLoads = RPAD * 8 / 32;
  uint4 w_next[kPrefetchW ? kWLoads : 1];
  auto load_w = [&](const TW* w, int64_t k0) {
    if constexpr (kPrefetchW) {
#pragma unroll
      for (int i = 0; i < kWLoads; ++i) {
        const int v = lane + 32 * i, j = v / 8, c = (v % 8) * 8;
        const int64_t col = k0 + c;
        w_next[i] = make_uint4(0, 0, 0, 0);
        if (j < p.rank && col < p.in) w_next[i] = load8_as<T>(w + j * p.in + col);
      }
    }
  };
  if (chunk_begin < chunk_end) load_x(chunk_begin * kTileK);

  if (threadIdx.x < kTileShrinkRows) {
    const int64_t row = row0 + threadIdx.x;
    row_slot[threadIdx.x] = row < p.tokens ? slot_of<IdT>(p.ids, row, p.adapters) : -1;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTileShrinkRows * p.rank; idx += 128) {  // base rows: xa = 0
    const int r = idx / static_cast<int>(p.rank), j = idx % static_cast<int>(p.rank);
    if (row0 + r < p.tokens && row_slot[r] < 0) out[(row0 + r) * p.rank + j] = 0.f;
  }

  bool x_loaded = true;  // the first slot's first x chunk is in flight already
  for (int a = next_slot(row_slot, kTileShrinkRows, -1); a != kNoSlot; a = next_slot(row_slot, kTileShrinkRows, a)) {
    const TW* w = static_cast<const TW*>(p.lora_A) + static_cast<int64_t>(a) * p.rank * p.in;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RPAD / 16];
#pragma unroll
    for (int f = 0; f < RPAD / 16; ++f) wmma::fill_fragment(acc[f], 0.f);
    if (chunk_begin < chunk_end) {
      if (!x_loaded) load_x(chunk_begin * kTileK);
      load_w(w, chunk_begin * kTileK);
    }
    x_loaded = false;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t k0 = chunk * kTileK;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
        *reinterpret_cast<uint4*>(&x_tile[warp][r][c]) = x_next[i];
      }
#pragma unroll
      for (int i = 0; i < kWLoads; ++i) {
        const int v = lane + 32 * i, j = v / 8, c = (v % 8) * 8;
        uint4 bits;
        if constexpr (kPrefetchW) {
          bits = w_next[i];
        } else {
          const int64_t col = k0 + c;
          bits = make_uint4(0, 0, 0, 0);
          if (j < p.rank && col < p.in) bits = load8_as<T>(w + j * p.in + col);
        }
        *reinterpret_cast<uint4*>(&w_tile[warp][j][c]) = bits;
      }
      if (chunk + 1 < chunk_end) {
        load_x(k0 + kTileK);
        load_w(w, k0 + kTileK);
      }
      __syncwarp();
#pragma unroll
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, MmaT, wmma::row_major> xf;
        wmma::load_matrix_sync(xf, reinterpret_cast<const MmaT*>(&x_tile[warp][0][kk]), kPitch);
#pragma unroll
        for (int f = 0; f < RPAD / 16; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, MmaT, wmma::col_major> wf;
          wmma::load_matrix_sync(wf, reinterpret_cast<const MmaT*>(&w_tile[warp][f * 16][kk]), kPitch);
          wmma::mma_sync(acc[f], xf, wf, acc[f]);
        }
      }
      __syncwarp();
    }

    // The four warps' partial sums, added in a fixed order through the (now free) A tiles.
    __syncthreads();
    float* sums = reinterpret_cast<float*>(&w_tile[0][0][0]);  // [kWarps][16][RPAD]
    static_assert(sizeof(float) * kWarps * 16 * RPAD <= sizeof(T) * kWarps * RPAD * kPitch, "reuse fits");
#pragma unroll
    for (int f = 0; f < RPAD / 16; ++f) {
      wmma::store_matrix_sync(sums + warp * 16 * RPAD + f * 16, acc[f], RPAD, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < 16 * RPAD; idx += 128) {
      const int r = idx / RPAD, j = idx % RPAD;
      if (j >= p.rank || row_slot[r] != a) continue;
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < kWarps; ++q) sum += sums[q * 16 * RPAD + r * RPAD + j];
      out[(row0 + r) * p.rank + j] = sum;
    }
    __syncthreads();  // the next slot stages its A tiles where the sums are
  }
}

// One 64 × 64 tile of y (rows m0…, columns n0…) += s[a]·xa·B[a]ᵀ for each slot a among its rows. Returns false for a
// tile of base rows only (y is final there, and in every other tile of these rows).
template <typename T, typename TW, typename IdT, int RPAD>
__device__ __forceinline__ bool multi_lora_expand_tile(const MultiLoraParams& p, int64_t m0, int64_t n0) {
  using namespace expand_wmma_detail;
  using namespace nvcuda;
  using MmaT = typename WmmaType<T>::type;
  constexpr int kPitch = RPAD + 8;
  __shared__ __align__(32) T xa_tile[kTile][kPitch];
  __shared__ __align__(32) T b_tile[kTile][kPitch];  // [o][j]: column-major (j × o) for the MMA
  __shared__ __align__(32) float out_tile[4][16][kOutPitch];
  __shared__ int row_slot[kTile];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* y = static_cast<T*>(p.y);

  // 1. This warp's 16 × 64 slice of y, loaded before anything else, even before the tile's ids are known (a tile
  //    of base rows then drops them): each global read that waits for the one before costs the block a round
  //    trip, and the single-adapter expand has only this one.
  uint4 old[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
    const int64_t row = m0 + warp * 16 + r, col = n0 + c;
    old[i] = make_uint4(0, 0, 0, 0);
    if (row < p.tokens && col < p.out) old[i] = *reinterpret_cast<const uint4*>(y + row * p.out + col);
  }
  if (threadIdx.x < kTile) {
    const int64_t row = m0 + threadIdx.x;
    row_slot[threadIdx.x] = row < p.tokens ? slot_of<IdT>(p.ids, row, p.adapters) : -1;
  }
  __syncthreads();
  int a = next_slot(row_slot, kTile, -1);
  if (a == kNoSlot) return false;  // a tile of base rows: y is final

  // B[a]'s columns n0…n0+63, all RPAD ranks (ranks ≥ r are zero): loaded into registers, stored into b_tile
  // once the previous slot's MMAs are done. The first slot's loads go out with xa's below.
  const TW* lora_B = static_cast<const TW*>(p.lora_B);
  constexpr int kBLoads = kTile * (RPAD / 8) / 128;
  static_assert(kBLoads * 128 == kTile * (RPAD / 8), "whole B vectors per thread");
  uint4 b_next[kBLoads];
  auto load_b = [&](int slot) {
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      const int v = threadIdx.x + 128 * i, n = v / (RPAD / 8), j = (v % (RPAD / 8)) * 8;
      const int64_t col = n0 + n;
      b_next[i] = make_uint4(0, 0, 0, 0);
      if (col < p.out && j < p.rank)
        b_next[i] = load8_as<T>(lora_B + (static_cast<int64_t>(slot) * p.out + col) * p.rank + j);
    }
  };
  load_b(a);

  // 2. xa for the tile's 64 rows: the splits added in order (from 0.f, split 0 first: the same sums as one value
  //    at a time), rounded to the MMA type once. Four ranks per 16-byte load (r % 8 == 0 on this path, so a quad
  //    is wholly inside or outside the rank), all of a thread's loads issued before the adds: xa is re-read from
  //    L2 by every column tile, and one scalar load after another (the first version) left each block waiting
  //    out a chain of L2 round trips (ncu: 74 µs for a 64 MB y, DRAM 19% busy).
  constexpr int kQuads = kTile * RPAD / 4;
  static_assert(kQuads % 128 == 0, "whole quads per thread");
  const int64_t split_stride = p.tokens * p.rank;
#pragma unroll
  for (int v0 = 0; v0 < kQuads; v0 += 128) {
    const int v = v0 + threadIdx.x, r = v / (RPAD / 4), j = (v % (RPAD / 4)) * 4;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    if (j < p.rank && row_slot[r] >= 0) {
      const float* src = p.partial + (m0 + r) * p.rank + j;
#pragma unroll 4
      for (int64_t s = 0; s < p.splits; ++s) {
        const float4 q = __ldg(reinterpret_cast<const float4*>(src + s * split_stride));
        sum.x += q.x;
        sum.y += q.y;
        sum.z += q.z;
        sum.w += q.w;
      }
    }
    xa_tile[r][j] = T(sum.x);
    xa_tile[r][j + 1] = T(sum.y);
    xa_tile[r][j + 2] = T(sum.z);
    xa_tile[r][j + 3] = T(sum.w);
  }

  float delta[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int q = 0; q < 8; ++q) delta[i][q] = 0.f;
  }
  for (;;) {
    // 3. B[a] into shared memory.
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      const int v = threadIdx.x + 128 * i, n = v / (RPAD / 8), j = (v % (RPAD / 8)) * 8;
      *reinterpret_cast<uint4*>(&b_tile[n][j]) = b_next[i];
    }
    __syncthreads();

    // 4. This warp's 16 × 64 product, parked in shared memory as float32.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, MmaT, wmma::row_major> xf[RPAD / 16];
#pragma unroll
    for (int kk = 0; kk < RPAD / 16; ++kk) {
      wmma::load_matrix_sync(xf[kk], reinterpret_cast<const MmaT*>(&xa_tile[warp * 16][kk * 16]), kPitch);
    }
#pragma unroll
    for (int f = 0; f < kTile / 16; ++f) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < RPAD / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MmaT, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, reinterpret_cast<const MmaT*>(&b_tile[f * 16][kk * 16]), kPitch);
        wmma::mma_sync(acc, xf[kk], bf, acc);
      }
      wmma::store_matrix_sync(&out_tile[warp][0][f * 16], acc, kOutPitch, wmma::mem_row_major);
    }
    __syncwarp();

    // 5. s[a]·product for this warp's rows of slot a.
    const float s = p.scalings[a];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
      if (row_slot[warp * 16 + r] != a) continue;
#pragma unroll
      for (int q = 0; q < 8; ++q) delta[i][q] = __fmul_rn(s, out_tile[warp][r][c + q]);
    }
    const int next = next_slot(row_slot, kTile, a);
    if (next != kNoSlot) load_b(next);  // in flight across the barrier
    __syncthreads();  // the next slot restages b_tile and out_tile
    if (next == kNoSlot) break;
    a = next;
  }

  // 6. y += s·Σ, rounded once, 16 bytes at a time; base rows are left as they are.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int v = lane + 32 * i, r = v / 8, c = (v % 8) * 8;
    const int64_t row = m0 + warp * 16 + r, col = n0 + c;
    if (row >= p.tokens || col >= p.out || row_slot[warp * 16 + r] < 0) continue;
    Pack8<T> pack;
    pack.bits = old[i];
#pragma unroll
    for (int q = 0; q < 8; ++q) pack.v[q] = T(__fadd_rn(static_cast<float>(pack.v[q]), delta[i][q]));
    *reinterpret_cast<uint4*>(y + row * p.out + col) = pack.bits;
  }
  return true;
}

// y += the rank-r terms of a 64-row tile, p.expand_column_tiles column tiles per block (one after another). Behind the
// fused GEMM (multi_lora_tiles_fused) most pairs were served by the GEMM, and each block of such a pair only reads
// one word and leaves: there two column tiles per block halve the blocks scheduled for nothing (4096 at 4096²: ≈ 3.8
// µs on an H100).
template <typename T, typename TW, typename IdT, int RPAD>
__global__ void __launch_bounds__(128) multi_lora_tile_expand_kernel(const MultiLoraParams p) {
  if constexpr (!WmmaType<T>::kCompiled) __trap();  // never launched there (wmma_dtype_usable)
  wait_for_preceding_kernel();  // launched as a programmatic dependent (dependent_launch.h): nothing read before
  constexpr int kTile = expand_wmma_detail::kTile;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  // Rows of a pair whose rank-r terms the fused GEMM added: nothing to do (a tile lies in one pair).
  if (p.pair_passes != nullptr && p.pair_passes[m0 / kMultiLoraPairRows] >= 0) return;
  const int per_block = p.expand_column_tiles > 1 ? p.expand_column_tiles : 1;
  for (int t = 0; t < per_block; ++t) {
    const int64_t n0 = (static_cast<int64_t>(blockIdx.y) * per_block + t) * kTile;
    if (n0 >= p.out) return;
    if (t > 0) __syncthreads();  // the tile before has read its shared memory
    if (!multi_lora_expand_tile<T, TW, IdT, RPAD>(p, m0, n0)) return;
  }
}

// The fused GEMM's per-batch inputs (multi_lora.cu, Hopper; lora_gemm_sm90.h), from the tile shrink's partial sums.
// One block per pair of 256 rows, one thread per row: the pair's distinct slots in increasing order, at most
// max_slots ≤ kMultiLoraMaxPairSlots (more: pair_passes = -1, and the expand adds the pair's terms; pair_slot_list has
// max_slots entries per pair, xs_by_pass max_slots blocks of 256 rows), and for each, the pair's 256
// rows of xs_by_pass: s[a]·Σ_splits partial[split][t][j] (the splits added in the expand's order) rounded once to T
// in the rows of slot a, zeros in the others (rows past the last token included).
template <typename T, typename IdT>
__global__ void __launch_bounds__(kMultiLoraPairRows)
    multi_lora_pair_passes_kernel(const MultiLoraParams p, int32_t* pair_passes, int32_t* pair_slot_list,
                                  T* xs_by_pass, int64_t xs_stride, int max_slots) {
  wait_for_preceding_kernel();  // launched as a programmatic dependent (dependent_launch.h): nothing read before
  __shared__ int candidate;
  __shared__ int slots[kMultiLoraMaxPairSlots + 1];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMultiLoraPairRows + threadIdx.x;
  const int a = row < p.tokens ? slot_of<IdT>(p.ids, row, p.adapters) : -1;
  int count = 0;
  for (int previous = -1; count <= max_slots; ++count) {  // the next smallest slot above `previous`
    if (threadIdx.x == 0) candidate = INT_MAX;
    __syncthreads();
    if (a > previous) atomicMin(&candidate, a);
    __syncthreads();
    const int next = candidate;
    if (next == INT_MAX) break;
    if (threadIdx.x == 0) slots[count] = next;
    previous = next;
    __syncthreads();  // every thread has read candidate before it is reset
  }
  __syncthreads();
  const int passes = count > max_slots ? -1 : count;
  if (threadIdx.x == 0) {
    pair_passes[blockIdx.x] = passes;
    for (int i = 0; i < max_slots; ++i) {
      pair_slot_list[blockIdx.x * max_slots + i] = i < passes ? slots[i] : 0;
    }
  }
  // Eight ranks at a time, every partial sum of the chunk loaded before its first store: the stores could alias the
  // loads for all the compiler knows, so a rank at a time (load, add, store) cost a round trip to memory per rank
  // (7.2 µs at 8 × 512 tokens, r = 16, on an H100). Then one 16-byte store per pass: xs_by_pass's rows are padded to
  // a multiple of 8 elements from a 16-byte-aligned address (new_lora_gemm_operand), and its padding columns get
  // zeros, which the GEMM's tensor maps never read.
  const float scale = a >= 0 ? p.scalings[a] : 0.f;
  const bool summed = a >= 0 && passes > 0;
  const int64_t split_stride = p.tokens * p.rank;
  for (int64_t j0 = 0; j0 < p.rank; j0 += 8) {
    float sum[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) sum[q] = 0.f;
    if (summed) {
      const float* source = p.partial + row * p.rank + j0;
#pragma unroll 4
      for (int64_t split = 0; split < p.splits; ++split) {  // in split order, as the expand adds them
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (j0 + q < p.rank) sum[q] += source[split * split_stride + q];
        }
      }
    }
    Pack8<T> value, zero;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      value.v[q] = static_cast<T>(scale * sum[q]);
      zero.v[q] = static_cast<T>(0.f);
    }
    for (int i = 0; i < passes; ++i) {
      const int64_t out_row = (static_cast<int64_t>(blockIdx.x) * max_slots + i) * kMultiLoraPairRows +
                              threadIdx.x;
      *reinterpret_cast<uint4*>(xs_by_pass + out_row * xs_stride + j0) = slots[i] == a ? value.bits : zero.bits;
    }
  }
}

}  // namespace cuda
}  // namespace lora_ext
