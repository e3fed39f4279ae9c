// dAᵀ = alpha · Σ_t keep(x)[t, :]ᵀ · G[t, :] on Hopper, with dropout's mask drawn in shared memory while the copy
// engine streams the next tiles (the Hopper shrink's scheme, lora_shrink_sm90.cu, on the backward's pass over x);
// also without dropout (keep = 1: no mask, no keep bytes).
// Design:
//
// - A block owns 64 of x's columns (one warpgroup's MMA height M) and a token split. Per pipeline stage the copy
//   engine brings x's (64 tokens × 64 columns) tile and G's (64 tokens × 64 ranks) tile, 128-byte swizzled; ranks past
//   r arrive as zeros. wgmma reads both as they lie: x's tile is the A operand MN-major (M along its rows), G's the B
//   operand N-major (sm90_narrow_wgmma.cuh), four 16-token K steps per stage.
// - Four consumer warpgroups take every fourth stage; each zeroes its x tile's dropped elements in shared memory (the
//   Philox mask of dropout_mask.h, chunk by chunk of 8 columns of a token, as the shrink draws it in the forward) and
//   writes the chunk's keep byte for the fused dx GEMM, then runs its MMAs into its own 64 × 64 float32 sums; the
//   draws overlap the copies, which hold no registers or threads. One producer thread issues the copies, 12 stages
//   ahead.
// - Epilogue: the four warpgroups' sums are added in shared memory in warpgroup order and written, scaled by alpha, as
//   the split's float32 partial sums, (columns × 64) per split; finalize_token_reduce_kernel (the tensor-core
//   reduction's) adds the splits in order and rounds once into dAᵀ. Results repeat bit for bit for a given GPU model
//   and shape.
// Bytes: x once (64 MB at 8192 × 4096), G once per column group from L2 (64 × 1 MB at r ≤ 64, 2 MB of it past the
// rank's zeros not read), the keep bytes written (4 MB), the partials (2 splits × 4096 × 64 × 4 B).
#include <ATen/ATen.h>

#include "lora_token_reduce_sm90.h"

#if defined(LORA_EXT_HAS_SM90A)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "../error_message.h"
#include "async_copy.cuh"
#include "dependent_launch.h"
#include "lora_token_reduce_wmma.cuh"
#include "sm90_narrow_wgmma.cuh"
#include "sm90_primitives.cuh"
#include "tensor_map.h"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kTileTokens = 64, kTileColumns = 64, kRanks = 64;
constexpr int kTileBytes = kTileTokens * kTileColumns * 2;  // 8 KB: x's tile, and G's (64 tokens × 64 ranks)
constexpr int kStageBytes = 2 * kTileBytes;
// Four consumer warpgroups, as the Hopper shrink's dropout variant: drawing a tile's mask is bound by the latency of
// its dependent chains, and four warps per scheduler keep the issue slots busy (docs/perf-notes.md v21). Then one
// producer warp.
constexpr int kConsumers = 4;
constexpr int kThreads = 128 * kConsumers + 32;
constexpr int kStages = 12;  // a multiple of kConsumers: each stage always belongs to the same warpgroup
constexpr int kSharedBytes = kStages * kStageBytes + 1024;  // + alignment slack
static_assert(kStages % kConsumers == 0, "each stage owned by one consumer warpgroup");
static_assert(kConsumers * kTileColumns * kRanks * 4 <= kStages * kStageBytes, "the sums fit in the stages");
// Below this many tokens the tensor-core reduction's many small blocks serve (as for the Hopper shrink with dropout).
constexpr int64_t kTokenReduceSm90MinTokens = 4096;

struct TokenReduceSm90Params {
  float* partials;  // (splits × columns_padded × 64)
  int64_t tokens;
  int64_t columns;         // x's
  int64_t columns_padded;  // to a multiple of 64
  int token_blocks;        // ⌈tokens / 64⌉
  int token_blocks_per_split;
  float alpha;
  const int64_t* dropout_seed;
  uint32_t dropout_threshold;
  uint8_t* keep_bytes;  // (tokens × keep_pitch), dropout_keep_bytes.cuh's layout
  int64_t keep_pitch;
};

template <typename T, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1)
    lora_token_reduce_sm90_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap g_map,
                                  const TokenReduceSm90Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  // Static, so that the host can tell this image from the stub of other targets (token_reduce_sm90_loaded).
  __shared__ uint64_t full[kStages], empty[kStages];
  extern __shared__ unsigned char shared_raw[];
  // The 128-byte swizzle pattern repeats every 1024 bytes: tiles start on a 1024-byte boundary.
  unsigned char* tiles =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared_raw) + 1023) & ~uintptr_t{1023});

  const int column0 = static_cast<int>(blockIdx.x) * kTileColumns;
  const int tb_begin = static_cast<int>(blockIdx.y) * p.token_blocks_per_split;
  const int tb_end = min(p.token_blocks, tb_begin + p.token_blocks_per_split);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);   // the producer's arrival (+ the copies' bytes)
      mbarrier_init(&empty[s], 1);  // the release by the consumer warpgroup that read it
    }
    fence_barrier_init();
  }
  __syncthreads();
  // Launched as a programmatic dependent (dependent_launch.h): G is the kernel ahead's output.
  wait_for_preceding_kernel();

  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;

  const int role = threadIdx.x / 128;  // < kConsumers: a consumer warpgroup; kConsumers: the producer warp
  if (role == kConsumers) {
    if (threadIdx.x == 128 * kConsumers) {
      prefetch_tensor_map(&x_map);
      prefetch_tensor_map(&g_map);
      int stage = 0;
      uint32_t phase = 0;
      for (int tb = tb_begin; tb < tb_end; ++tb) {
        mbarrier_wait(&empty[stage], phase ^ 1);  // passes at first use
        mbarrier_arrive_expect_bytes(&full[stage], kStageBytes);  // whole boxes, zeros included
        unsigned char* x_tile = tiles + stage * kStageBytes;
        copy_tile_async(x_tile, &x_map, &full[stage], column0, tb * kTileTokens);
        copy_tile_async(x_tile + kTileBytes, &g_map, &full[stage], 0, tb * kTileTokens);
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    // The warp whole again before the block's barriers below: its other lanes skipped the loop, and a barrier
    // (bar.sync, .aligned) must be reached by all of a warp's threads together.
    __syncwarp();
  } else {
    const int consumer = role, thread = threadIdx.x % 128;
    uint64_t seed = 0;
    if constexpr (kDropout) seed = static_cast<uint64_t>(*p.dropout_seed);
    int stage = 0;
    uint32_t phase = 0;
    for (int tb = tb_begin; tb < tb_end; ++tb) {
      if ((tb - tb_begin) % kConsumers == consumer) {
        mbarrier_wait(&full[stage], phase);
        unsigned char* x_tile = tiles + stage * kStageBytes;
        const unsigned char* g_tile = x_tile + kTileBytes;
        if constexpr (kDropout) {
          // The tile's dropped elements zeroed in place: 512 16-byte chunks (token row, columns 8c … 8c+7, stored at
          // chunk c ^ (row % 8) of the row by the 128-byte swizzle), four per thread, each chunk's keep byte written
          // for the dx GEMM (where it reads them). Tokens past the end and columns past x's are the copy's zeros:
          // nothing to draw there.
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int chunk = thread + 128 * j, row = chunk / 8, c = chunk % 8;
            const int64_t token = static_cast<int64_t>(tb) * kTileTokens + row;
            const int64_t column = column0 + 8 * c;
            if (token < p.tokens && column < p.columns) {
              uint4* address = reinterpret_cast<uint4*>(x_tile + row * 128 + ((c ^ (row % 8)) * 16));
              unsigned keep;
              *address = apply_dropout8_as_masks_with_keep(*address, seed, token, column / 8, p.dropout_threshold,
                                                           keep);
              if (p.keep_bytes != nullptr) p.keep_bytes[token * p.keep_pitch + column / 8] = static_cast<uint8_t>(keep);
            }
          }
          // These writes before the MMAs' reads: wgmma reads shared memory through the async proxy, as the copy
          // engine does (the same fence).
          fence_shared_for_copy_engine();
          asm volatile("bar.sync %0, 128;" ::"r"(1 + consumer) : "memory");  // the warpgroup's writes all done
        }
#pragma unroll
        for (int i = 0; i < 32; ++i) fence_accumulator(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kTileTokens / 16; ++ks) {
          // 16 tokens = two 8-row swizzle atoms: +2048 bytes per K step in both tiles.
          const uint64_t desc_x = swizzled_n_major_tile_descriptor(x_tile + ks * 16 * 128, kTileBytes);
          const uint64_t desc_g = swizzled_n_major_tile_descriptor(g_tile + ks * 16 * 128, kTileBytes);
          wgmma_m64n64k16_mn_major<T>(acc, desc_x, desc_g, 1);
        }
        wgmma_commit();
#pragma unroll
        for (int i = 0; i < 32; ++i) fence_accumulator(acc[i]);
        wgmma_wait<0>();
        if (thread == 0) mbarrier_arrive_local(&empty[stage]);
      }
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }
  // Every copy has landed and every MMA has read its stage: the stages now hold each consumer warpgroup's sums,
  // (64 columns × 64 ranks) float32 row-major, one after the other.
  __syncthreads();
  float* sums = reinterpret_cast<float*>(tiles);
  if (role < kConsumers) {
    float* own = sums + role * kTileColumns * kRanks;
    const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int row = 16 * warp + lane / 4;
#pragma unroll
    for (int j = 0; j < kRanks / 8; ++j) {
      const int column = 8 * j + 2 * (lane % 4);
      *reinterpret_cast<float2*>(own + row * kRanks + column) = make_float2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<float2*>(own + (row + 8) * kRanks + column) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
  __syncthreads();
  float* partial = p.partials + (static_cast<int64_t>(blockIdx.y) * p.columns_padded + column0) * kRanks;
  for (int index = threadIdx.x; index < kTileColumns * kRanks; index += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kConsumers; ++c) sum += sums[c * kTileColumns * kRanks + index];
    partial[index] = p.alpha * sum;
  }
#else
  // The other targets of a multi-architecture build: never launched (token_reduce_sm90_loaded refuses them).
  (void)x_map, (void)g_map, (void)p;
  __trap();
#endif
}

// LORA_EXT_TOKEN_REDUCE_SM90: unset or auto = where it pays (token_reduce_sm90_pays), 0 = never, 1 = from
// kTokenReduceSm90MinTokens at any rank (the benchmarks), force = from one token (the tests). Unknown values mean auto.
// The stage ring's wrap is covered by tests/test_token_reduce_sm90_cuda.py's "ring-wraps" shapes (26 token blocks per
// block against 12 stages; a training step's 8192 × 4096 gives 64), run on an H100 in session 21 (docs/gpu-test-results.md).
enum class TokenReduceSm90Setting { kOff, kAuto, kOn, kForce };
TokenReduceSm90Setting token_reduce_sm90_setting() {
  const char* setting = std::getenv("LORA_EXT_TOKEN_REDUCE_SM90");
  if (setting == nullptr) return TokenReduceSm90Setting::kAuto;
  if (std::strcmp(setting, "0") == 0) return TokenReduceSm90Setting::kOff;
  if (std::strcmp(setting, "1") == 0) return TokenReduceSm90Setting::kOn;
  if (std::strcmp(setting, "force") == 0) return TokenReduceSm90Setting::kForce;
  return TokenReduceSm90Setting::kAuto;
}

// Where it beats the other reductions (H100, bf16, 4096², training steps with dropout 0.05; docs/perf-notes.md v22):
// with dropout, ranks 17–64 from 4096 tokens, where the tensor-core reduction's 32- and 64-rank variants are slow
// (r = 64, 8192 tokens: dA 79.4 + 18.1 µs of finalize → 48.6 + 4.9; 4096 tokens: 47.7 + 17.4 → 26.8 + 4.9). At
// r ≤ 16 both take the same time (8192 tokens: 47.7 + 4.7 against 49.4 + 2.6 µs), and the tensor-core reduction keeps
// it. Without dropout cuBLAS's product serves ranks above 16 (lora_steps.cuh).
bool token_reduce_sm90_pays(int64_t tokens, int64_t rank, bool dropout) {
  return dropout && rank > 16 && tokens >= kTokenReduceSm90MinTokens;
}

// Whether the sm_90a image of this kernel is the one loaded on the current device (its shared memory limit raised).
// Decided once per device. The other targets' stub has no static shared memory, the real kernel its barriers.
template <typename T, bool kDropout>
bool token_reduce_sm90_loaded() {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> decided{};  // 0: not yet; -1: not loaded; 1: loaded
  const int device = c10::cuda::current_device();
  std::atomic<int>* slot = device < kMaxDevices ? &decided[device] : nullptr;
  if (slot != nullptr && slot->load() != 0) return slot->load() > 0;
  auto kernel = lora_token_reduce_sm90_kernel<T, kDropout>;
  const cudaError_t pending = cudaPeekAtLastError();  // not ours to clear
  cudaFuncAttributes attributes{};
  const bool loaded =
      tensor_map_encoder() != nullptr && cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
      attributes.sharedSizeBytes > 0 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes) == cudaSuccess;
  if (pending == cudaSuccess) (void)cudaGetLastError();  // a refused query is an answer (the caller's paths run)
  if (slot != nullptr) slot->store(loaded ? 1 : -1);
  return loaded;
}

// Token splits for a grid of `column_groups` × splits one-block-per-SM blocks: the count (1–8, ≥ one token block per
// split) whose last wave is fullest, the fewer splits on a tie (each split adds a partial to the finalize's sum).
int token_splits(int64_t column_groups, int token_blocks, int64_t sms) {
  int best = 1;
  double best_fill = 0.0;
  for (int splits = 1; splits <= std::min(8, token_blocks); ++splits) {
    const int64_t blocks = column_groups * splits;
    const int64_t waves = (blocks + sms - 1) / sms;
    const double fill = static_cast<double>(blocks) / static_cast<double>(waves * sms);
    if (fill > best_fill + 1e-9) {
      best = splits;
      best_fill = fill;
    }
  }
  return best;
}

template <typename T, bool kDropout>
bool launch_token_reduce_sm90(at::Tensor& out, const at::Tensor& x, const at::Tensor& g, double alpha,
                              const int64_t* seed, uint32_t threshold, KeepBytesOut keep_out) {
  if (!token_reduce_sm90_loaded<T, kDropout>()) return false;
  const int64_t tokens = x.size(0), columns = x.size(1), rank = g.size(1);
  const int64_t column_groups = (columns + kTileColumns - 1) / kTileColumns;
  const int token_blocks = static_cast<int>((tokens + kTileTokens - 1) / kTileTokens);
  // One block per SM (≈ 193 KB of shared memory): e.g. 64 column groups × 2 splits at 4096 columns on 132 SMs.
  const int splits_wanted =
      token_splits(column_groups, token_blocks, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int per_split = (token_blocks + splits_wanted - 1) / splits_wanted;
  const int splits = (token_blocks + per_split - 1) / per_split;

  const CUtensorMap x_map = swizzled_tile_map(x.data_ptr(), x.scalar_type(), tokens, columns, x.stride(0), kTileTokens);
  const CUtensorMap g_map = swizzled_tile_map(g.data_ptr(), g.scalar_type(), tokens, rank, g.stride(0), kTileTokens);
  const int64_t columns_padded = column_groups * kTileColumns;
  at::Tensor partials = at::empty({splits, columns_padded, kRanks}, x.options().dtype(at::kFloat));
  TokenReduceSm90Params p{};
  p.partials = partials.data_ptr<float>();
  p.tokens = tokens;
  p.columns = columns;
  p.columns_padded = columns_padded;
  p.token_blocks = token_blocks;
  p.token_blocks_per_split = per_split;
  p.alpha = static_cast<float>(alpha);
  p.dropout_seed = seed;
  p.dropout_threshold = threshold;
  p.keep_bytes = keep_out.bytes;
  p.keep_pitch = keep_out.pitch;

  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(column_groups), static_cast<unsigned>(splits));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSharedBytes;
  config.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attributes[1];
  unsigned count = 0;
  // The loaded image is sm_90a (checked above), whose wait is real: no dependent_launch_supported() needed.
  if (dependent_launch_wanted() && dependent_launch_enabled()) attributes[count++] = programmatic_stream_serialization();
  config.attrs = attributes;
  config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, lora_token_reduce_sm90_kernel<T, kDropout>, x_map, g_map, p));

  const bool columns_fastest = out.stride(0) == 1 && out.stride(1) != 1;
  const int64_t blocks = (columns + kFinalizeColumns - 1) / kFinalizeColumns;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "finalize_token_reduce", [&] {
    launch_dependent(finalize_token_reduce_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)), dim3(256), 0,
                     partials.data_ptr<float>(), static_cast<int64_t>(splits), columns, columns_padded,
                     static_cast<int>(rank), kRanks, out.data_ptr<scalar_t>(), out.stride(0), out.stride(1),
                     columns_fastest, RoundedCopy{});
  });
  return true;
}

}  // namespace

bool token_reduce_sm90(at::Tensor& out, const at::Tensor& x, const at::Tensor& g, double alpha,
                       const int64_t* dropout_seed, uint32_t dropout_threshold, KeepBytesOut keep_out) {
  const TokenReduceSm90Setting setting = token_reduce_sm90_setting();
  const int64_t tokens = x.size(0), columns = x.size(1), rank = g.size(1);
  switch (setting) {
    case TokenReduceSm90Setting::kOff:
      return false;
    case TokenReduceSm90Setting::kAuto:
      if (!token_reduce_sm90_pays(tokens, rank, dropout_seed != nullptr)) return false;
      break;
    case TokenReduceSm90Setting::kOn:
      if (tokens < kTokenReduceSm90MinTokens) return false;
      break;
    case TokenReduceSm90Setting::kForce:
      if (tokens < 1) return false;
      break;
  }
  const auto dtype = x.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || g.scalar_type() != dtype) return false;
  if (rank < 1 || rank > kRanks || columns < 1 || columns % 8 != 0 || g.size(0) != tokens) return false;
  if (tokens > INT32_MAX - kTileTokens || columns > INT32_MAX - kTileColumns) return false;  // 32-bit coordinates
  if (!copy_engine_rows(x) || !copy_engine_rows(g)) return false;
  if (out.dim() != 2 || out.size(0) != columns || out.size(1) != rank) return false;
  const auto* properties = at::cuda::getDeviceProperties(x.get_device());
  if (properties->major != 9 || properties->minor != 0) return false;
  const bool bf16 = dtype == at::kBFloat16;
  if (dropout_seed != nullptr) {
    return bf16 ? launch_token_reduce_sm90<at::BFloat16, true>(out, x, g, alpha, dropout_seed, dropout_threshold,
                                                               keep_out)
                : launch_token_reduce_sm90<at::Half, true>(out, x, g, alpha, dropout_seed, dropout_threshold, keep_out);
  }
  return bf16 ? launch_token_reduce_sm90<at::BFloat16, false>(out, x, g, alpha, nullptr, 0, KeepBytesOut{})
              : launch_token_reduce_sm90<at::Half, false>(out, x, g, alpha, nullptr, 0, KeepBytesOut{});
}

}  // namespace cuda
}  // namespace lora_ext

#else  // no sm_90a target in this build: the tensor-core reduction serves

namespace lora_ext {
namespace cuda {

bool token_reduce_sm90(at::Tensor&, const at::Tensor&, const at::Tensor&, double, const int64_t*, uint32_t,
                       KeepBytesOut) {
  return false;
}

}  // namespace cuda
}  // namespace lora_ext

#endif  // LORA_EXT_HAS_SM90A
