// The whole layer for a few tokens (decoding) in one launch, base product included:
//   y  = x·Wᵀ + b + s·xa·Bᵀ   (rounded once)
//   xa = x·Aᵀ                 (float32, written out: backward needs it)
// Why one kernel: at 1–16 tokens the layer is bound by launches and host time, not bytes (PERF-FACTS: each extra
// kernel costs 6–10 µs against a 24 µs base). cuBLAS's GEMV followed by our decode kernel (lora_decode.cuh) is two
// launches and a second trip through ATen's dispatcher on the host. Here W is streamed once, at the bandwidth a
// GEMV needs, and the rank-r work rides along in warps of their own.
//
// Layout. Clusters of 4 blocks; cluster c owns output rows [128c, 128c + 128), and its block b takes the b-th
// quarter of K for all of them:
// - the block stages x[:, its quarter of K] in shared memory once (2 KB per token at K = 4096);
// - warps 0–7 each reduce 16 of the 128 rows over that quarter with mma.sync m16n8k16 (W's rows as M, tokens as N,
//   float32 accumulators), streaming W with two batches of 16-byte loads in flight per lane;
// - warps 8… (one per 16 ranks) reduce A's ranks over the same quarter;
// - after a cluster barrier, block b sums the 4 partials of rows 128c + 32b … 128c + 32b + 31 and of xa through
//   distributed shared memory, in cluster order (so every block holds bit-identical xa), adds the bias and
//   s·xa·Bᵀ (float32 FMAs) and rounds once.
// Clusters of 8 blocks (an eighth of K each) ran in two waves at out = 4096: 32 clusters, of which an H100 holds 30
// at once (ncu), so the last two ran alone after the others (23 µs at 16 tokens; docs/perf-notes.md v15). 32 clusters
// of 4 fit in one.
// W is read once in all; x once per cluster (from L2); A once per cluster (from L2: 4 MB at out = 4096, r = 16, an
// eighth of W's bytes). An earlier version that read x from L2 in every warp was L2-bound from 16 tokens on
// (docs/perf-notes.md v9).
//
// K is permuted inside each 32-wide chunk so that every operand a lane needs is 16 contiguous bytes: lane (g, q)
// loads W[g][8q … 8q+7], W[g+8][8q … 8q+7] and x[token g][8q … 8q+7]. The mma's k pairs (2q, 2q+1) and
// (2q+8, 2q+9) then hold physical elements (8q, 8q+1) and (8q+2, 8q+3) in the first mma, (8q+4, 8q+5) and
// (8q+6, 8q+7) in the second. A dot product does not care in which order K is summed, as long as both operands
// use the same order, and here they do: the A fragment's k pair p and the B fragment's k pair p come from the
// same lane quarter q and the same 32-bit word.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include <array>
#include <atomic>
#include <mutex>

#include "async_copy.cuh"
#include "cluster_launch.h"
#include "mma_sync.cuh"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {

constexpr int kGemvRows = 16;           // output rows per warp (one mma M tile)
constexpr int kGemvRowWarps = 8;        // warps per block reducing W's rows: a cluster's 128 rows
constexpr int kGemvClusterBlocks = 4;   // blocks per cluster, each a quarter of K
constexpr int kGemvGroupRows = kGemvRowWarps * kGemvRows;  // a cluster's output rows
constexpr int kGemvMaxTokens = 16;      // two mma N tiles of 8 tokens (from 17 on, two launches measured faster)
constexpr int kGemvMaxRank = 64;        // four warps of 16 ranks
// The staged x slice (dynamic shared memory, above the 48 KB a launch gets unasked) is at most this large: with a
// quarter of K per block, 16 tokens of K up to ≈ 20 000 (8 tokens: ≈ 40 000). Wider K (e.g. a 70B model's
// down-projection, K = 28 672, at 9–16 tokens) takes cuBLAS + lora_decode.cuh; with clusters of 8 it fitted twice the
// K, at the cost of a second wave of clusters at out = 4096 (docs/perf-notes.md v15).
constexpr int kGemvMaxXTileBytes = 160 * 1024;

struct DecodeGemvParams {
  const void* x;  // (tokens × K), unit stride along K
  int64_t x_stride_t;
  const void* weight;  // (N × K), unit stride along K
  int64_t w_stride_n;
  const void* bias;  // (N) or null
  int64_t bias_stride;
  const void* lora_A;  // (r × K), unit stride along K
  int64_t a_stride_j;
  const void* lora_B;  // (N × r), unit stride along r
  int64_t b_stride_n;
  void* y;  // (tokens × N), contiguous
  float* lora_activation;  // (tokens × r), contiguous
  int tokens, k, n, rank;
  float scaling;
};

// W is read exactly once: stream it past L1 and mark it first to leave L2, so x, A and B stay cached.
__device__ __forceinline__ uint4 load_streaming(const void* src) { return __ldcs(static_cast<const uint4*>(src)); }

// Starts copying x[:, chunks c_begin … c_end) into shared memory, kTokens rows of x_stride_bytes; rows past the real
// tokens and elements past K are zero-filled, so the mma tiles need no bounds of their own. All of a thread's copies
// are in flight at once (a load-then-store loop waited for L2 once per 16 bytes: ≈ 4 µs at 16 tokens).
template <typename T, int kTokens>
__device__ __forceinline__ void stage_x_slice(char* x_tile, int x_stride_bytes, const DecodeGemvParams& p,
                                              int c_begin, int c_end) {
  const int vectors_per_row = (c_end - c_begin) * 4;  // 16-byte vectors
  const T* x = static_cast<const T*>(p.x);
  for (int v = threadIdx.x; v < kTokens * vectors_per_row; v += blockDim.x) {
    const int t = v / vectors_per_row, column = v % vectors_per_row;
    const int k = c_begin * 32 + column * 8;
    const bool real = t < p.tokens && k < p.k;
    copy_16_bytes_async(x_tile + t * x_stride_bytes + column * 16, real ? x + t * p.x_stride_t + k : x,
                        real ? 16 : 0);
  }
}

// K chunks per batch of loads, two batches in flight per lane (this one and the next): 4, or 2 where 64 ranks (12
// warps) leave too few registers to hold two batches of 4 at two blocks per SM.
template <int NT, int RT>
constexpr int gemv_unroll() {
  return RT >= 4 ? 2 : 4;
}

// One warp's 16 rows (row stride `row_stride`, `valid_rows` of them real) over this block's K chunks, against the
// block's x tile in shared memory. acc[nt] is the lane's m16n8 accumulator fragment for tokens 8·nt … 8·nt + 7.
template <typename T, int NT, int U>
struct RowTileReducer {
  const T* row_lo;
  const T* row_hi;
  bool lo_ok, hi_ok;
  bool stream;  // W: read once, streamed past L1; A: kept cached (every cluster reads it)
  int k, c_begin, c_end;
  uint4 lo[U], hi[U];

  __device__ __forceinline__ RowTileReducer(const T* rows, int64_t row_stride, int valid_rows, bool stream_, int k_,
                                            int c_begin_, int c_end_)
      : stream(stream_), k(k_), c_begin(c_begin_), c_end(c_end_) {
    const int g = (threadIdx.x % 32) / 4;
    row_lo = rows + g * row_stride;
    row_hi = rows + (g + 8) * row_stride;
    lo_ok = g < valid_rows;
    hi_ok = g + 8 < valid_rows;
  }

  // Loads for chunks c0 … c0 + U − 1 (zeros past the slice, past K or past the real rows). The streaming choice is
  // made once per batch, so each batch's loads issue back to back.
  __device__ __forceinline__ void load(int c0, uint4 (&lo_out)[U], uint4 (&hi_out)[U]) const {
    if (stream) {
      load_batch<true>(c0, lo_out, hi_out);
    } else {
      load_batch<false>(c0, lo_out, hi_out);
    }
  }

  template <bool STREAM>
  __device__ __forceinline__ void load_batch(int c0, uint4 (&lo_out)[U], uint4 (&hi_out)[U]) const {
    const int q = threadIdx.x % 4;
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = (c0 + u) * 32 + q * 8;
      const bool in_range = c0 + u < c_end && kk < k;  // K % 8 == 0: an 8-vector is wholly in or out
      if constexpr (STREAM) {
        lo_out[u] = in_range && lo_ok ? load_streaming(row_lo + kk) : zero;
        hi_out[u] = in_range && hi_ok ? load_streaming(row_hi + kk) : zero;
      } else {
        lo_out[u] = in_range && lo_ok ? __ldg(reinterpret_cast<const uint4*>(row_lo + kk)) : zero;
        hi_out[u] = in_range && hi_ok ? __ldg(reinterpret_cast<const uint4*>(row_hi + kk)) : zero;
      }
    }
  }

  // The first batch: issued before the block stages x, so its latency overlaps the staging.
  __device__ __forceinline__ void prefetch() { load(c_begin, lo, hi); }

  // x_tile: this block's slice of x, row t at x_tile + t·x_stride_bytes, chunk c − c_begin at byte 64·(c − c_begin).
  __device__ __forceinline__ void reduce(float (&acc)[NT][4], const char* x_tile, int x_stride_bytes) {
    const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    for (int c0 = c_begin; c0 < c_end; c0 += U) {
      uint4 next_lo[U], next_hi[U];
      if (c0 + U < c_end) load(c0 + U, next_lo, next_hi);  // next batch in flight meanwhile
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c0 + u >= c_end) break;
        const char* x_chunk = x_tile + (c0 + u - c_begin) * 64 + q * 16;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 xv = *reinterpret_cast<const uint4*>(x_chunk + (g + 8 * nt) * x_stride_bytes);
          mma_16x8x16<T>(acc[nt], {lo[u].x, hi[u].x, lo[u].y, hi[u].y}, xv.x, xv.y);
          mma_16x8x16<T>(acc[nt], {lo[u].z, hi[u].z, lo[u].w, hi[u].w}, xv.z, xv.w);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) lo[u] = next_lo[u], hi[u] = next_hi[u];
    }
  }
};

// One 16-row tile's accumulators, transposed: out[token · stride + row] (float32). stride ≡ 4 (mod 16) keeps the
// warp's stores apart: lane (g, q) writes token 2q (+1) at row g (+8), and 2q·stride ≡ 8q (mod 32) banks.
template <int NT>
__device__ __forceinline__ void store_fragment_transposed(float* out, int stride, const float (&acc)[NT][4]) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float* token_row = out + (nt * 8 + 2 * q) * stride;
    token_row[g] = acc[nt][0];
    token_row[stride + g] = acc[nt][1];
    token_row[g + 8] = acc[nt][2];
    token_row[stride + g + 8] = acc[nt][3];
  }
}

// The bytes between consecutive token rows of the staged x slice: an odd multiple of 64, so the eight lanes of
// each quarter-warp (two rows, four 16-byte columns) read eight different 16-byte bank groups.
__host__ __device__ inline int gemv_x_stride_bytes(int k) {
  const int chunks = (k + 31) / 32, slice_chunks = (chunks + kGemvClusterBlocks - 1) / kGemvClusterBlocks;
  return 64 * (slice_chunks | 1);
}

// Launched in clusters of kGemvClusterBlocks blocks along x, (kGemvRowWarps + RT) warps each, with NT·8 rows of
// gemv_x_stride_bytes(k) of dynamic shared memory (launch_decode_gemv). Cluster c owns output rows
// [128c, 128c + 128); its block b (cluster rank) takes the b-th quarter of K for all of them (warp w: rows 16w …)
// and for A's ranks (warps 8 …), then sums the cluster's partials for rows 128c + 32b … and adds the rank-r term.
template <typename T, int NT, int RT>
__global__ void __launch_bounds__((kGemvRowWarps + RT) * 32, 2) lora_decode_gemv_kernel(const DecodeGemvParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kTokens = NT * 8;
  constexpr int kThreads = (kGemvRowWarps + RT) * 32;
  constexpr int kBlockRows = kGemvGroupRows / kGemvClusterBlocks;  // the rows a block finishes
  constexpr int kOutputsPerThread = (kTokens * kBlockRows + kThreads - 1) / kThreads;
  // Partials token-major, rows padded by 4: the fragment stores are free of bank conflicts and the reads below
  // (consecutive rows or ranks of one token, across the cluster) at most 2-way. Rows-major partials cost 8–32-way
  // conflicts on every distributed-shared-memory read, and a 32-token, rank-64 call took 133 µs (perf-notes v9).
  constexpr int kWStride = kGemvGroupRows + 4, kAStride = RT * 16 + 4;
  __shared__ float w_partial[kTokens * kWStride];   // this block's quarter of K, tokens × rows
  __shared__ float xa_partial[kTokens * kAStride];  // the same for A's ranks
  __shared__ float activation[kTokens][RT * 16];    // the cluster's sum: xa
  __shared__ __align__(16) T b_tile[kBlockRows][RT * 16 + 8];  // B's rows for this block's outputs (padded: 2-way)
  extern __shared__ __align__(16) char x_tile[];        // x[:, this block's K slice], kTokens rows
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int part = static_cast<int>(cluster.block_rank());
  const int warp = threadIdx.x / 32;
  const int group_row0 = (blockIdx.x / kGemvClusterBlocks) * kGemvGroupRows;
  const int chunks = (p.k + 31) / 32;
  const int c_begin = chunks * part / kGemvClusterBlocks, c_end = chunks * (part + 1) / kGemvClusterBlocks;
  const int x_stride_bytes = gemv_x_stride_bytes(p.k);

  const bool w_warp = warp < kGemvRowWarps;
  const int tile_row0 = w_warp ? group_row0 + warp * kGemvRows : (warp - kGemvRowWarps) * 16;
  const T* rows = w_warp ? static_cast<const T*>(p.weight) + static_cast<int64_t>(tile_row0) * p.w_stride_n
                         : static_cast<const T*>(p.lora_A) + static_cast<int64_t>(tile_row0) * p.a_stride_j;
  const int64_t row_stride = w_warp ? p.w_stride_n : p.a_stride_j;
  const int valid_rows = (w_warp ? p.n : p.rank) - tile_row0;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  // What the epilogue reads from global memory goes out first, so none of it waits after the cluster barrier:
  // the thread's bias values (its output i is o = thread + i·threads: token o / 32, row o % 32 of the block's 32)
  // and this block's 32 rows of B.
  const T* bias = static_cast<const T*>(p.bias);
  float bias_values[kOutputsPerThread];
#pragma unroll
  for (int i = 0; i < kOutputsPerThread; ++i) {
    const int o = threadIdx.x + i * kThreads, out_t = o / kBlockRows;
    const int out_row = group_row0 + part * kBlockRows + o % kBlockRows;
    bias_values[i] = out_t < p.tokens && out_row < p.n && bias != nullptr
                         ? static_cast<float>(bias[static_cast<int64_t>(out_row) * p.bias_stride])
                         : 0.f;
  }
  const T* lora_B = static_cast<const T*>(p.lora_B);
  for (int v = threadIdx.x; v < kBlockRows * (p.rank / 8); v += blockDim.x) {
    const int r = v / (p.rank / 8), j = v % (p.rank / 8) * 8, row = group_row0 + part * kBlockRows + r;
    copy_16_bytes_async(&b_tile[r][j], row < p.n ? lora_B + row * p.b_stride_n + j : lora_B, row < p.n ? 16 : 0);
  }

  // W's (or A's) first loads go out before x is staged, so their latency overlaps the staging.
  RowTileReducer<T, NT, gemv_unroll<NT, RT>()> reducer(rows, row_stride, valid_rows, w_warp, p.k, c_begin, c_end);
  reducer.prefetch();
  stage_x_slice<T, kTokens>(x_tile, x_stride_bytes, p, c_begin, c_end);
  copy_async_wait_all();
  __syncthreads();
  if (valid_rows > 0) reducer.reduce(acc, x_tile, x_stride_bytes);  // A's padding warp or rows past n: zeros
  store_fragment_transposed<NT>(w_warp ? w_partial + warp * kGemvRows : xa_partial + tile_row0,
                                w_warp ? kWStride : kAStride, acc);
  cluster.sync();  // every block's partials written (release/acquire across the cluster)

  // xa = the 4 partials of x·Aᵀ, summed in cluster order (every block of every cluster gets the same bits).
  for (int i = threadIdx.x; i < p.tokens * p.rank; i += blockDim.x) {
    const int t = i / p.rank, j = i % p.rank;
    float sum = 0.f;
#pragma unroll
    for (int b = 0; b < kGemvClusterBlocks; ++b) sum += cluster.map_shared_rank(xa_partial, b)[t * kAStride + j];
    activation[t][j] = sum;
    if (blockIdx.x == 0) p.lora_activation[i] = sum;
  }
  __syncthreads();

  // This block's 32 rows of the group: y[t, row] = Σ_b partial_b + b[row] + s · xa[t, :]·B[row, :], rounded once.
  // Consecutive threads take consecutive rows of one token, so each token's 32 outputs are one 64-byte store.
#pragma unroll
  for (int i = 0; i < kOutputsPerThread; ++i) {
    const int o = threadIdx.x + i * kThreads, out_t = o / kBlockRows, r = o % kBlockRows;
    const int out_r = part * kBlockRows + r, out_row = group_row0 + out_r;
    if (out_t >= p.tokens || out_row >= p.n) continue;
    float base = 0.f;
#pragma unroll
    for (int b = 0; b < kGemvClusterBlocks; ++b) {
      base += cluster.map_shared_rank(w_partial, b)[out_t * kWStride + out_r];
    }
    float update = 0.f;
    for (int j = 0; j < p.rank; ++j) update = fmaf(activation[out_t][j], static_cast<float>(b_tile[r][j]), update);
    // Pinned roundings (no FMA contraction): the same bits from every build.
    const float value = __fadd_rn(__fadd_rn(base, bias_values[i]), __fmul_rn(p.scaling, update));
    static_cast<T*>(p.y)[static_cast<int64_t>(out_t) * p.n + out_row] = T(value);
  }
  cluster.sync();  // no block leaves (freeing its shared memory) while another still reads its partials
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled for an architecture without clusters: decode_gemv_shape_supported never routes here
#endif
}

// Whether one launch of lora_decode_gemv_kernel can compute this call: 16-bit x with adapters of the same type,
// no dropout (inference and p = 0 training), a few tokens, and every row 16-byte aligned for the vector loads.
inline bool decode_gemv_shape_supported(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                        const at::Tensor& lora_B, double dropout_p) {
  const int64_t tokens = x.size(0), k = x.size(1), n = weight.size(0), rank = lora_A.size(0);
  if (dropout_p > 0.0 || tokens == 0 || tokens > kGemvMaxTokens) return false;
  if (rank == 0 || rank > kGemvMaxRank || rank % 8 != 0) return false;
  const auto dtype = x.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || lora_A.scalar_type() != dtype) return false;
  if (k % 8 != 0 || k >= (int64_t{1} << 30) || n >= (int64_t{1} << 30) || n == 0) return false;
  const int64_t token_rows = tokens <= 8 ? 8 : 16;
  if (token_rows * gemv_x_stride_bytes(static_cast<int>(k)) > kGemvMaxXTileBytes) return false;
  const auto rows_aligned = [](const at::Tensor& t) {
    return t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) % 8 == 0) && aligned16(t.data_ptr());
  };
  if (!rows_aligned(x) || !rows_aligned(weight) || !rows_aligned(lora_A) || !rows_aligned(lora_B)) return false;
  (void)bias;  // read one element at a time, any stride
  return true;
}

// Whether this instantiation can be launched with `config` here, preparing it if need be: a device and build with
// sm_90 code for it, its dynamic shared memory limit raised to what the launch asks (only above the 48 KB a launch
// gets unasked, and only as far as asked: smaller GPUs allow less), and at least one 4-block cluster resident with
// that much shared memory (a partitioned GPU may hold none). Remembered per instantiation and device: the largest
// size prepared, and the smallest refused, so each size costs the queries once. Per instantiation, not per kernel
// type: all of them share the type void(*)(DecodeGemvParams) and differ in shared memory (found on the H100: a
// 16-token launch after a 1-token one failed with "invalid argument" while the limit was raised once per type).
template <typename T, int NT, int RT>
bool prepare_gemv_launch(const cudaLaunchConfig_t& config) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int64_t>, kMaxDevices> prepared_up_to{};  // bytes; 0: none yet
  static std::array<std::atomic<int64_t>, kMaxDevices> refused_from{};    // bytes; 0: none refused
  static std::mutex preparing;  // raising the limit is a read-modify-write of the kernel's attribute
  const int device = at::cuda::current_device();
  if (device >= kMaxDevices) return false;
  const int64_t bytes = static_cast<int64_t>(config.dynamicSmemBytes) + 1;  // + 1: 0 means "not yet"
  if (bytes <= prepared_up_to[device].load()) return true;
  const int64_t refused = refused_from[device].load();
  if (refused != 0 && bytes >= refused) return false;

  const std::lock_guard<std::mutex> lock(preparing);
  if (bytes <= prepared_up_to[device].load()) return true;
  const cudaError_t pending = cudaPeekAtLastError();  // not ours to clear
  const auto kernel = lora_decode_gemv_kernel<T, NT, RT>;
  cudaFuncAttributes attributes{};
  bool ok = at::cuda::getCurrentDeviceProperties()->major >= 9 &&
            cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess && attributes.ptxVersion >= 90;
  if (ok && attributes.sharedSizeBytes + config.dynamicSmemBytes > 48 * 1024 &&
      static_cast<int64_t>(attributes.maxDynamicSharedSizeBytes) < static_cast<int64_t>(config.dynamicSmemBytes)) {
    ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(config.dynamicSmemBytes)) == cudaSuccess;
  }
  int clusters = 0;
  ok = ok && cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
  if (pending == cudaSuccess) (void)cudaGetLastError();  // a refused query is an answer (take the other path)
  if (ok) {
    prepared_up_to[device].store(bytes);
  } else if (refused == 0 || bytes < refused) {
    refused_from[device].store(bytes);
  }
  return ok;
}

template <typename T>
void launch_decode_gemv_typed(at::Tensor& y, at::Tensor& lora_activation, const at::Tensor& x,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, bool* launched) {
  DecodeGemvParams p{};
  p.x = x.data_ptr();
  p.x_stride_t = x.stride(0);
  p.weight = weight.data_ptr();
  p.w_stride_n = weight.stride(0);
  const bool has_bias = bias.has_value() && bias->defined();
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  p.bias_stride = has_bias ? bias->stride(0) : 0;
  p.lora_A = lora_A.data_ptr();
  p.a_stride_j = lora_A.stride(0);
  p.lora_B = lora_B.data_ptr();
  p.b_stride_n = lora_B.stride(0);
  p.y = y.data_ptr();
  p.lora_activation = lora_activation.data_ptr<float>();
  p.tokens = static_cast<int>(x.size(0));
  p.k = static_cast<int>(x.size(1));
  p.n = static_cast<int>(weight.size(0));
  p.rank = static_cast<int>(lora_A.size(0));
  p.scaling = static_cast<float>(scaling);

  const auto launch = [&](auto nt_tag, auto rt_tag) {
    constexpr int NT = decltype(nt_tag)::value;
    constexpr int RT = decltype(rt_tag)::value;
    const auto kernel = lora_decode_gemv_kernel<T, NT, RT>;
    const unsigned clusters = static_cast<unsigned>((p.n + kGemvGroupRows - 1) / kGemvGroupRows);
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(clusters * kGemvClusterBlocks);
    config.blockDim = dim3((kGemvRowWarps + RT) * 32);
    config.dynamicSmemBytes = static_cast<size_t>(NT * 8) * gemv_x_stride_bytes(p.k);
    config.stream = at::cuda::getCurrentCUDAStream();
    cudaLaunchAttribute cluster = cluster_along_x(kGemvClusterBlocks);
    config.attrs = &cluster;
    config.numAttrs = 1;
    if (!prepare_gemv_launch<T, NT, RT>(config)) return;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
    *launched = true;
  };
  const auto by_rank = [&](auto nt_tag) {
    if (p.rank <= 16) launch(nt_tag, std::integral_constant<int, 1>{});
    else if (p.rank <= 32) launch(nt_tag, std::integral_constant<int, 2>{});
    else launch(nt_tag, std::integral_constant<int, 4>{});
  };
  if (p.tokens <= 8) by_rank(std::integral_constant<int, 1>{});
  else by_rank(std::integral_constant<int, 2>{});
}

// y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ and xa = x·Aᵀ in one launch, or an undefined tensor where this GPU cannot run it
// (no clusters, or a build without sm_90 code for it): the caller then takes cuBLAS + lora_decode.cuh.
inline at::Tensor launch_decode_gemv(at::Tensor& lora_activation, const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, double scaling) {
  if (at::cuda::getCurrentDeviceProperties()->major < 9) return at::Tensor();  // no clusters: nothing to allocate
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  bool launched = false;
  if (x.scalar_type() == at::kBFloat16) {
    launch_decode_gemv_typed<at::BFloat16>(y, lora_activation, x, weight, bias, lora_A, lora_B, scaling, &launched);
  } else {
    launch_decode_gemv_typed<at::Half>(y, lora_activation, x, weight, bias, lora_A, lora_B, scaling, &launched);
  }
  return launched ? y : at::Tensor();
}

}  // namespace cuda
}  // namespace lora_ext
