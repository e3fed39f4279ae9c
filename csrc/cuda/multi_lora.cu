// CUDA kernels of lora_ext::multi_lora_forward (multi-adapter batches, inference): each token names its
// adapter slot.
//
// y = x·Wᵀ + b comes from cuBLAS (at::linear); then one or two launches add s[a]·(x·A[a]ᵀ)·B[a]ᵀ. Every kernel reads
// the ids on the device (no host sync, no sorting, no per-batch metadata: CUDA graphs capture the call) and
// touches only the slots the tokens name, so the cost does not depend on how many adapters are loaded. Ids
// outside [-1, n) are treated as -1 (the base layer alone): checking them would need a sync.
// Three paths, picked on the host from shapes alone:
//   tiles   (multi_lora_tiles.cuh) 16-bit x, > kGatherMaxTokens tokens, vector-friendly shapes: tensor-core
//           shrink over 16-token tiles and expand over 64 × 64 tiles of y, each tile walking its distinct slots
//           (prefill: runs of tokens sharing an adapter, Punica's SGMV shape);
//   gather  (multi_lora_gather.cuh) few tokens, or float32 x: per-token shrink split over the in-dimension, and
//           a per-token expand (decoding, Punica's BGMV shape); on Hopper, up to kGatherMaxTokens tokens, both in
//           one launch with a cluster of 8 blocks per token (multi_lora_cluster.cuh), launched as the base GEMM's
//           programmatic dependent;
//   general (below) any shape or stride: one block per token for the shrink, a per-token expand.
// The tiles and gather paths write the shrink's partial sums per k-split and the expand adds them in a fixed
// order: no atomics, repeated calls give the same bits.
#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "../checks.h"
#include "../no_autocast.h"
#include "dependent_launch.h"
#include "lora_decode.cuh"
#include "lora_gemm_launch.cuh"
#include "lora_gemm_sm90.h"
#include "multi_lora_cluster.cuh"
#include "multi_lora_gather.cuh"
#include "multi_lora_tiles.cuh"
#include "nvtx_range.h"
#include "one_adapter_decode.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / 32;
constexpr int kRankChunk = 16;  // ranks accumulated per pass over x[t]
constexpr int kExpandThreads = 256;


template <typename T, typename TW, typename IdT>
__global__ void __launch_bounds__(kShrinkThreads)
    multi_lora_shrink_kernel(const T* __restrict__ x, int64_t x_stride, const TW* __restrict__ A, int64_t in,
                             int64_t rank, int64_t adapters, const IdT* __restrict__ ids, float* __restrict__ xa) {
  const int64_t t = blockIdx.x;
  float* out = xa + t * rank;
  const int64_t a = slot_of<IdT>(ids, t, adapters);
  if (a < 0) {
    for (int64_t j = threadIdx.x; j < rank; j += kShrinkThreads) out[j] = 0.f;
    return;
  }
  const T* xt = x + t * x_stride;
  const TW* At = A + a * rank * in;
  __shared__ float partial[kShrinkWarps][kRankChunk];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t j0 = 0; j0 < rank; j0 += kRankChunk) {
    float acc[kRankChunk];
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) acc[j] = 0.f;
    for (int64_t k = threadIdx.x; k < in; k += kShrinkThreads) {
      const float xv = static_cast<float>(xt[k]);
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j)
        if (j0 + j < rank) acc[j] = fmaf(xv, static_cast<float>(At[(j0 + j) * in + k]), acc[j]);
    }
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) {
      float v = acc[j];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][j] = v;
    }
    __syncthreads();
    if (threadIdx.x < kRankChunk && j0 + threadIdx.x < rank) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kShrinkWarps; ++w) sum += partial[w][threadIdx.x];
      out[j0 + threadIdx.x] = sum;
    }
    __syncthreads();
  }
}

template <typename T, typename TW, typename IdT>
__global__ void __launch_bounds__(kExpandThreads)
    multi_lora_expand_kernel(T* __restrict__ y, int64_t out_features, const float* __restrict__ xa,
                             const TW* __restrict__ B, int64_t rank, int64_t adapters, const IdT* __restrict__ ids,
                             const float* __restrict__ scalings) {
  const int64_t t = blockIdx.x;  // tokens on x (up to 2^31 - 1 blocks), output tiles on y
  const int64_t a = slot_of<IdT>(ids, t, adapters);
  if (a < 0) return;
  extern __shared__ float xa_row[];  // rank floats
  for (int64_t j = threadIdx.x; j < rank; j += kExpandThreads) xa_row[j] = xa[t * rank + j];
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= out_features) return;
  const TW* Bo = B + (a * out_features + o) * rank;
  float acc = 0.f;
  for (int64_t j = 0; j < rank; ++j) acc = fmaf(xa_row[j], static_cast<float>(Bo[j]), acc);
  T* yo = y + t * out_features + o;
  // s·Σ rounded, then added and rounded once into y's dtype, as the CPU kernel does (no FMA contraction).
  *yo = static_cast<T>(__fadd_rn(static_cast<float>(*yo), __fmul_rn(scalings[a], acc)));
}

// At most this many tokens take the gather kernels when the tile kernels could run: the gather shrink reads A[a]
// once per token (r·in elements from L2), the tiles once per 16 tokens but with at most tokens / 16 blocks.
constexpr int64_t kGatherMaxTokens = 64;

template <typename Fn>
void dispatch_rank_pad(int64_t rank, Fn&& fn) {
  if (rank <= 16) {
    fn(std::integral_constant<int, 16>{});
  } else if (rank <= 32) {
    fn(std::integral_constant<int, 32>{});
  } else {
    fn(std::integral_constant<int, 64>{});
  }
}

// k-splits so that the shrink has about two blocks per SM: `blocks` blocks before splitting, `units` units of the
// in-dimension to share out, at least `min_units` per split. Returns {splits, units per split}.
std::pair<int64_t, int64_t> split_in_dimension(int64_t blocks, int64_t units, int64_t min_units) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = std::max<int64_t>(1, (2 * sms + blocks - 1) / blocks);
  const int64_t per_split = std::max<int64_t>(std::min(min_units, units), (units + wanted - 1) / wanted);
  return {(units + per_split - 1) / per_split, per_split};
}

// Decoding on Hopper: shrink and expand in one clustered launch (multi_lora_gather_cluster_kernel), or false where
// this GPU or build cannot run it (the two gather kernels then serve).
template <typename T, typename TW, typename IdT>
bool launch_gather_cluster(MultiLoraParams p) {
  if (p.tokens > kGatherMaxTokens) return false;
  bool launched = false;
  dispatch_rank_pad(p.rank, [&](auto rpad_tag) {
    constexpr int RPAD = decltype(rpad_tag)::value;
    const auto run = [&](auto kernel) {
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(kGatherClusterBlocks, static_cast<unsigned>(p.tokens));  // a cluster per token
      config.blockDim = dim3(kGatherClusterThreads);
      config.stream = at::cuda::getCurrentCUDAStream();
      // Launched as the base GEMM's programmatic dependent: its launch and its shrink (x and A[a] only) overlap the
      // GEMM's end, and it waits for the GEMM before reading y (multi_lora_forward_cuda launches nothing in between).
      cudaLaunchAttribute attributes[2] = {cluster_along_x(kGatherClusterBlocks), programmatic_stream_serialization()};
      config.attrs = attributes;
      config.numAttrs = 1;
      if (!cluster_decode_usable(kernel, config)) return;
      p.dependent_launch = dependent_launch_enabled();
      if (p.dependent_launch) config.numAttrs = 2;
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
      launched = true;
    };
    if (p.rank % 8 == 0) {
      run(multi_lora_gather_cluster_kernel<T, TW, IdT, RPAD, true>);
    } else {
      run(multi_lora_gather_cluster_kernel<T, TW, IdT, RPAD, false>);
    }
  });
  return launched;
}

template <typename T, typename TW, typename IdT>
void launch_gather(MultiLoraParams p, const at::Tensor& x) {
  static_assert(!std::is_same_v<IdT, OneAdapter>, "the two-kernel gather path reads ids and scalings");
  if (launch_gather_cluster<T, TW, IdT>(p)) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto [splits, per_split] = split_in_dimension(p.tokens, p.in / 8, kGatherShrinkThreads);
  at::Tensor partial = at::empty({splits, p.tokens, p.rank}, x.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  p.splits = splits;
  p.split_size = per_split;
  const int64_t column_blocks = (p.out + kGatherExpandColumns - 1) / kGatherExpandColumns;
  LORA_CHECK(splits <= 65535 && column_blocks <= 65535, "lora_ext::multi_lora_forward: in_features = ", p.in,
             " or out_features = ", p.out, " is over this kernel's limit");
  dispatch_rank_pad(p.rank, [&](auto rpad_tag) {
    constexpr int RPAD = decltype(rpad_tag)::value;
    multi_lora_gather_shrink_kernel<T, TW, IdT, RPAD>
        <<<dim3(static_cast<unsigned>(p.tokens), static_cast<unsigned>(p.splits)), kGatherShrinkThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(column_blocks));
    if (p.rank % 8 == 0) {
      multi_lora_gather_expand_kernel<T, TW, IdT, RPAD, true><<<grid, kGatherExpandThreads, 0, stream>>>(p);
    } else {
      multi_lora_gather_expand_kernel<T, TW, IdT, RPAD, false><<<grid, kGatherExpandThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The most adapters a pair of 256 rows may have for the fused GEMM to add their terms (one K block each, mostly zeros:
// ≈ 1.6% of the pair's GEMM time per term at 4096 wide); pairs of more go to the tile expand, which loops over the
// slots of each tile of y and costs far more (H100, 4096², r = 16, in a graph: 128 sequences × 32 tokens of 64
// adapters, 8 per pair, 1.41× the base layer with 4 → 1.28× with 8; 4096 one-token rows of 8 adapters 2.04× → 1.58×;
// 16 gains nothing more there: docs/perf-notes.md v23). LORA_EXT_PAIR_SLOTS=1…16 sets it. The operand by pass holds
// max_slots × 256 rows per pair of (r rounded up to 8) 16-bit values: 256 bytes per token at r = 16, 1 KB at r = 64.
constexpr int kDefaultPairSlots = 8;
int fused_pair_slots() {
  const char* setting = std::getenv("LORA_EXT_PAIR_SLOTS");
  const int slots = setting != nullptr ? std::atoi(setting) : kDefaultPairSlots;
  return slots >= 1 && slots <= kMultiLoraMaxPairSlots ? slots : kDefaultPairSlots;
}

// Column tiles per block of the tile expand behind the fused GEMM (multi_lora_tile_expand_kernel says why 2);
// LORA_EXT_EXPAND_TILES=1…16 sets it (benchmarks compare settings in one process).
int fused_expand_column_tiles() {
  const char* setting = std::getenv("LORA_EXT_EXPAND_TILES");
  const int tiles = setting != nullptr ? std::atoi(setting) : 2;
  return tiles >= 1 && tiles <= 16 ? tiles : 2;
}

// The tile shrink's split of the in-dimension and its partial sums (splits × tokens × r, float32), set in p.
at::Tensor tile_shrink_workspace(MultiLoraParams& p, const at::Tensor& x, int64_t shrink_tiles) {
  const int64_t chunks = (p.in + shrink_detail::kTileK - 1) / shrink_detail::kTileK;
  const auto [splits, per_split] = split_in_dimension(shrink_tiles, chunks, shrink_detail::kWarps);
  at::Tensor partial = at::empty({splits, p.tokens, p.rank}, x.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  p.splits = splits;
  p.split_size = per_split;
  return partial;
}

template <typename T, typename TW, typename IdT>
void launch_tiles(MultiLoraParams p, const at::Tensor& x) {
  static_assert(!std::is_same_v<IdT, OneAdapter>, "the tile kernels read ids and scalings");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t shrink_tiles = (p.tokens + kTileShrinkRows - 1) / kTileShrinkRows;
  const at::Tensor partial = tile_shrink_workspace(p, x, shrink_tiles);
  const int64_t row_tiles = (p.tokens + kTileExpandRows - 1) / kTileExpandRows;
  const int64_t column_tiles = (p.out + kTileExpandColumns - 1) / kTileExpandColumns;
  LORA_CHECK(p.splits <= 65535 && column_tiles <= 65535, "lora_ext::multi_lora_forward: in_features = ", p.in,
             " or out_features = ", p.out, " is over this kernel's limit");
  dispatch_rank_pad(p.rank, [&](auto rpad_tag) {
    constexpr int RPAD = decltype(rpad_tag)::value;
    multi_lora_tile_shrink_kernel<T, TW, IdT, RPAD>
        <<<dim3(static_cast<unsigned>(shrink_tiles), static_cast<unsigned>(p.splits)), 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    multi_lora_tile_expand_kernel<T, TW, IdT, RPAD>
        <<<dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(column_tiles)), 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Prefill on Hopper (fused_lora_gemm_usable): the tile shrink; then per 256-row pair its distinct slots and their
// rank-r operands (multi_lora_pair_passes_kernel); then one GEMM y = x·Wᵀ + b + Σ_passes xs_i·B[slot_i]ᵀ, each pass a
// K block more (no pass of the expand over y, which cost ≈ a quarter of the base GEMM at 4096 × 4096); last, the tile
// expand for pairs of more than fused_pair_slots() slots only. Returns y.
template <typename T, typename IdT>
at::Tensor launch_tiles_fused(MultiLoraParams p, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& lora_B_stack) {
  const int64_t shrink_tiles = (p.tokens + kTileShrinkRows - 1) / kTileShrinkRows;
  const at::Tensor partial = tile_shrink_workspace(p, x, shrink_tiles);
  const int64_t pairs = (p.tokens + kMultiLoraPairRows - 1) / kMultiLoraPairRows;
  at::Tensor pair_passes = at::empty({pairs}, x.options().dtype(at::kInt));
  const int max_slots = fused_pair_slots();
  at::Tensor pair_slot_list = at::empty({pairs, max_slots}, x.options().dtype(at::kInt));
  at::Tensor xs_by_pass = new_lora_gemm_operand(pairs * max_slots * kMultiLoraPairRows, p.rank, x.options());
  const int64_t row_tiles = (p.tokens + kTileExpandRows - 1) / kTileExpandRows;
  const int64_t column_tiles = (p.out + kTileExpandColumns - 1) / kTileExpandColumns;
  LORA_CHECK(p.splits <= 65535 && column_tiles <= 65535, "lora_ext::multi_lora_forward: in_features = ", p.in,
             " or out_features = ", p.out, " is over this kernel's limit");
  at::Tensor y;
  dispatch_rank_pad(p.rank, [&](auto rpad_tag) {
    constexpr int RPAD = decltype(rpad_tag)::value;
    // Each kernel, the GEMM too, as the programmatic dependent of the one before where the call is large enough
    // (multi_lora_forward_cuda's DependentLaunchScope).
    launch_dependent(multi_lora_tile_shrink_kernel<T, T, IdT, RPAD>,
                     dim3(static_cast<unsigned>(shrink_tiles), static_cast<unsigned>(p.splits)), dim3(128), 0, p);
    launch_dependent(multi_lora_pair_passes_kernel<T, IdT>, dim3(static_cast<unsigned>(pairs)),
                     dim3(kMultiLoraPairRows), 0, p, pair_passes.data_ptr<int32_t>(),
                     pair_slot_list.data_ptr<int32_t>(), xs_by_pass.data_ptr<T>(), xs_by_pass.stride(0),
                     max_slots);
    y = fused_multi_lora_gemm(x, weight, bias, xs_by_pass, lora_B_stack.view({p.adapters * p.out, p.rank}),
                              pair_passes, pair_slot_list);
    p.y = y.data_ptr();
    p.pair_passes = pair_passes.data_ptr<int32_t>();
    p.expand_column_tiles = fused_expand_column_tiles();
    const int64_t column_blocks = (column_tiles + p.expand_column_tiles - 1) / p.expand_column_tiles;
    launch_dependent(multi_lora_tile_expand_kernel<T, T, IdT, RPAD>,
                     dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(column_blocks)), dim3(128), 0, p);
  });
  return y;
}

template <typename T, typename TW, typename IdT>
void launch_general(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                    const at::Tensor& ids, at::Tensor& y, const MultiLoraDims& d, const char* op) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor xa = at::empty({d.tokens, d.max_rank}, x.options().dtype(at::kFloat));
  const dim3 expand_grid(static_cast<unsigned>(d.tokens),
                         static_cast<unsigned>((d.out_features + kExpandThreads - 1) / kExpandThreads));
  const size_t expand_smem = static_cast<size_t>(d.max_rank) * sizeof(float);
  LORA_CHECK(expand_smem <= 48 * 1024, op, ": r_max = ", d.max_rank, " is over this kernel's limit of ",
             48 * 1024 / sizeof(float));
  LORA_CHECK((d.out_features + kExpandThreads - 1) / kExpandThreads <= 65535, op, ": out_features = ",
             d.out_features, " is over this kernel's limit");
  multi_lora_shrink_kernel<T, TW, IdT><<<static_cast<unsigned>(d.tokens), kShrinkThreads, 0, stream>>>(
      x.data_ptr<T>(), x.stride(0), A.data_ptr<TW>(), d.in_features, d.max_rank, d.adapters, ids.data_ptr<IdT>(),
      xa.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  multi_lora_expand_kernel<T, TW, IdT><<<expand_grid, kExpandThreads, expand_smem, stream>>>(
      y.data_ptr<T>(), d.out_features, xa.data_ptr<float>(), B.data_ptr<TW>(), d.max_rank, d.adapters,
      ids.data_ptr<IdT>(), scale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

constexpr int64_t kOneAdapterWideRankMaxTokens = 48;

bool launch_one_adapter_decode(at::Tensor& y, at::Tensor& lora_activation, const at::Tensor& x,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  const char* setting = std::getenv("LORA_EXT_DECODE_CLUSTER");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
  const int64_t tokens = x.size(0), in = x.size(1), out = y.size(1), rank = lora_A.size(0);
  if (tokens == 0 || tokens > kGatherMaxTokens || rank == 0 || rank > 64 || in % 8 != 0 || out % 8 != 0) return false;
  // Ranks above 32 (the kernel's 64-rank bucket: A and B staged in several chunks per block) lose to the general
  // kernels past 48 tokens (H100, 4096², r = 64, in a CUDA graph: 64 tokens 2.43× the base layer against 2.01×,
  // 48 tokens 1.91× against 1.99×; docs/perf-notes.md v19).
  if (rank > 32 && tokens > kOneAdapterWideRankMaxTokens) return false;
  // The kernel's layout: x rows of unit column stride on 16-byte boundaries, A (rank × in), B (out × rank) and y
  // contiguous and 16-byte aligned (multi_lora_cluster.cuh). Views elsewhere keep lora_decode.cuh's kernels.
  if (x.stride(1) != 1 || (tokens > 1 && x.stride(0) % 8 != 0) || !aligned16(x.data_ptr())) return false;
  if (!lora_A.is_contiguous() || !aligned16(lora_A.data_ptr())) return false;
  if (!lora_B.is_contiguous() || !aligned16(lora_B.data_ptr())) return false;
  if (!y.is_contiguous() || !aligned16(y.data_ptr()) || y.scalar_type() != x.scalar_type()) return false;
  MultiLoraParams p{};
  p.x = x.data_ptr();
  p.x_stride = tokens > 1 ? x.stride(0) : in;
  p.lora_A = lora_A.data_ptr();
  p.lora_B = lora_B.data_ptr();
  p.y = y.data_ptr();
  p.tokens = tokens;
  p.in = in;
  p.out = out;
  p.adapters = 1;
  p.rank = rank;
  p.one_adapter_scaling = static_cast<float>(scaling);
  p.lora_activation = lora_activation.data_ptr<float>();
  bool launched = false;
  dispatch_activation_and_adapter(x.scalar_type(), lora_A.scalar_type(), "lora_ext::lora_forward",
                                  [&](auto act_tag, auto adapter_tag) {
                                    using T = decltype(act_tag);
                                    using TW = decltype(adapter_tag);
                                    launched = launch_gather_cluster<T, TW, OneAdapter>(p);
                                  });
  return launched;
}

namespace {

at::Tensor multi_lora_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& lora_A_stack, const at::Tensor& lora_B_stack,
                                   const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  const char* op = "lora_ext::multi_lora_forward";
  const MultiLoraDims d =
      check_multi_lora_inputs(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const NoAutocast no_autocast;  // at::linear in x's dtype (no_autocast.h)
  const NvtxRange range(op);
  // The prefill's kernels as programmatic dependents of each other, where the call is large enough
  // (dependent_launch.h; the decoding kernel's own dependent launch is separate, launch_gather_cluster).
  const DependentLaunchScope dependent_launch(dependent_launch_pays(d.tokens, d.in_features, d.out_features));
  LORA_CHECK(d.tokens <= INT32_MAX, op, ": at most 2^31 - 1 tokens per call, got ", d.tokens);
  LORA_CHECK(d.adapters <= INT32_MAX, op, ": at most 2^31 - 1 adapter slots, got ", d.adapters);
  // Operands prepared before the base GEMM (usually no copies at all), so that the GEMM is the last launch before
  // the low-rank kernels: the decoding cluster kernel may start before it ends (launch_gather_cluster).
  const at::Tensor x_c = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor A = lora_A_stack.contiguous(), B = lora_B_stack.contiguous();
  const at::Tensor ids = adapter_ids.contiguous();
  const at::Tensor scale = scalings.to(at::kFloat).contiguous();  // a device op: no sync
  // 16-byte vectors of x rows, A rows and B rows (of 8 ranks).
  const bool operand_vectors = d.in_features > 0 && d.in_features % 8 == 0 && d.out_features % 8 == 0 &&
                               d.max_rank <= 64 && x_c.stride(0) % 8 == 0 && aligned16(x_c.data_ptr()) &&
                               aligned16(A.data_ptr()) && aligned16(B.data_ptr());
  const bool sixteen_bit = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  // The fused GEMM (Hopper, prefill): 16-bit adapters in x's dtype, whose stack the copy engine reads as it lies,
  // and row coordinates (B's stack, the operand by pass) that fit its 32-bit tensor-map coordinates.
  const bool fused = operand_vectors && d.tokens > kGatherMaxTokens && d.out_features > 0 && d.max_rank > 0 &&
                     d.max_rank % 8 == 0 && sixteen_bit && A.scalar_type() == x.scalar_type() &&
                     d.adapters * d.out_features <= INT32_MAX - 256 &&
                     d.tokens <= INT32_MAX / kMultiLoraMaxPairSlots - 256 &&
                     fused_lora_gemm_usable(x_c, weight, bias, d.max_rank);
  at::Tensor y = fused ? at::Tensor() : at::linear(x, weight, bias).contiguous();
  if (!fused && (d.tokens == 0 || d.max_rank == 0 || d.out_features == 0)) return y;  // nothing to add

  // And y's rows (the fused GEMM's output is new, so aligned).
  const bool vectors = operand_vectors && (fused || aligned16(y.data_ptr()));
  const bool tiles = vectors && wmma_dtype_usable(x.scalar_type()) && d.max_rank % 8 == 0 && d.tokens > kGatherMaxTokens;

  MultiLoraParams p{};
  p.x = x_c.data_ptr();
  p.x_stride = x_c.stride(0);
  p.lora_A = A.data_ptr();
  p.lora_B = B.data_ptr();
  p.scalings = scale.data_ptr<float>();
  p.ids = ids.data_ptr();
  p.y = fused ? nullptr : y.data_ptr();
  p.tokens = d.tokens;
  p.in = d.in_features;
  p.out = d.out_features;
  p.adapters = d.adapters;
  p.rank = d.max_rank;
  dispatch_activation_and_adapter(x.scalar_type(), A.scalar_type(), op, [&](auto act_tag, auto adapter_tag) {
    using T = decltype(act_tag);
    using TW = decltype(adapter_tag);
    const auto launch = [&](auto id_tag) {
      using IdT = decltype(id_tag);
      if constexpr (!std::is_same_v<T, float> && std::is_same_v<T, TW>) {
        if (fused) {
          y = launch_tiles_fused<T, IdT>(p, x_c, weight, bias, B);
          return;
        }
      }
      if constexpr (!std::is_same_v<T, float>) {
        if (tiles) return launch_tiles<T, TW, IdT>(p, x_c);
      }
      if (vectors) return launch_gather<T, TW, IdT>(p, x_c);
      launch_general<T, TW, IdT>(x_c, A, B, scale, ids, y, d, op);
    };
    if (ids.scalar_type() == at::kLong) {
      launch(int64_t{});
    } else {
      launch(int32_t{});
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("multi_lora_forward", &multi_lora_forward_cuda); }

}  // namespace cuda
}  // namespace lora_ext
