// out (tokens × r, float32) = alpha · X·Wᵀ on Hopper (lora_shrink_sm90.h says where it serves). Design:
//
// - A block owns 64 rows of X (one warpgroup's MMA height) and a K range; per pipeline stage the copy engine brings a
//   (64 rows × 64 K) tile of X (8 KB) and W's matching slice, 128-byte swizzled: K-contiguous W as (RPAD ranks × 64 K),
//   N-contiguous W (Bᵀ, read from B as it lies) as (64 K × 64 ranks). Ranks past r arrive as zeros.
// - One producer thread issues the copies, 8 stages ahead (64 KB of X in flight per block); one consumer warpgroup runs
//   four wgmma.m64nRPADk16 per stage into RPAD / 2 float32 registers per thread, one stage's MMAs in flight.
// - With dropout (on X: the forward's x·Aᵀ), four consumer warpgroups take every fourth stage, and each zeroes its
//   tile's dropped elements in shared memory (the Philox mask of dropout_mask.h, as the other kernels draw it) before
//   its MMAs: the draws overlap the copies, which hold no registers or threads, where the other shrinks' draws
//   compete with their own loads (+12 µs per pass over x at 8192 × 4096).
// - Too few row tiles to fill the GPU (under ≈ 0.9 × SMs): the K range is split over a cluster of 2, 4 or 8 blocks,
//   whose partial sums are added through distributed shared memory in cluster-rank order (results repeat bit for
//   bit for a given GPU model and shape).
// - Epilogue: the partial sums go through shared memory (the pipeline's stages, free by then), then out and the
//   RoundedCopy are written row by row, coalesced.
// Bytes: X once; W once per block, from L2 (at r = 64 and 8192 × 4096: 64 MB of L2 reads beside X's 64 MB).
#include <ATen/ATen.h>

#include "lora_shrink_sm90.h"

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
#include "cluster_launch.h"
#include "dependent_launch.h"
#include "sm90_narrow_wgmma.cuh"
#include "sm90_primitives.cuh"
#include "tensor_map.h"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kTileM = 64, kTileK = 64;
// Pipeline stages: 8 (64 KB of X in flight per block). More gained nothing at 8192 tokens and lost at 2048, where
// fewer blocks of a K-split cluster then fit per SM (H100, docs/perf-notes.md v21); LORA_EXT_SHRINK_SM90_STAGES
// overrides it for such measurements.
constexpr int kDefaultStages = 8, kMaxStages = 16;
// Consumer warpgroups per block: one, or four with dropout, which take every fourth stage each: drawing a tile's mask
// is ≈ 600 instructions per thread, bound by the latency of its dependent chains, and four warps per scheduler keep
// the issue slots busy (with two, the kernel took 49.9 µs at 8192 × 4096 for 30.6 without dropout: ncu, v21).
// Then one producer warp.
constexpr int consumer_warpgroups(bool dropout) { return dropout ? 4 : 1; }
constexpr int default_stages(bool dropout) { return dropout ? 12 : kDefaultStages; }
constexpr int threads_per_block(bool dropout) { return 128 * consumer_warpgroups(dropout) + 32; }
constexpr int kMaxSplits = 8;  // the portable cluster size
constexpr int kTileXBytes = kTileM * kTileK * 2;  // 8 KB

// Below this many tokens the shrink stays on lora_shrink.cuh / cuBLAS (measured on an H100: docs/perf-notes.md v21).
constexpr int64_t kShrinkSm90MinTokens = 1024;

template <int RPAD, bool kNMajorW>
struct ShrinkLayout {
  // W's slice per stage: (RPAD × 64 K) K-contiguous, or (64 K × 64 ranks) N-contiguous.
  static constexpr int kTileWBytes = kNMajorW ? kTileK * 64 * 2 : RPAD * kTileK * 2;
  static constexpr int kStageBytes = kTileXBytes + kTileWBytes;
  static constexpr int kMaxStagesInBudget = 220 * 1024 / kStageBytes;
  static constexpr int kStagesLimit = kMaxStagesInBudget < kMaxStages ? kMaxStagesInBudget : kMaxStages;
  static constexpr int shared_bytes(int stages) { return stages * kStageBytes + 1024; }  // + alignment slack
  // The consumer warpgroups' (64 × RPAD) float32 partial sums reuse the X stages (at least min_stages of them).
  static constexpr int min_stages(bool dropout) { return dropout ? 8 : 4; }
  static_assert(kStagesLimit >= default_stages(true) && kStagesLimit >= default_stages(false), "the defaults fit");
  static_assert(consumer_warpgroups(true) * kTileM * RPAD * 4 <= min_stages(true) * kTileXBytes &&
                    consumer_warpgroups(false) * kTileM * RPAD * 4 <= min_stages(false) * kTileXBytes,
                "the partial sums fit in the X stages");
};

struct ShrinkSm90Params {
  float* out;  // (tokens × rank), contiguous
  int64_t tokens;
  int rank;
  int64_t k;
  int k_blocks;  // ⌈K / 64⌉
  int stages;    // pipeline stages, min_stages … kStagesLimit, a multiple of the consumer warpgroups
  float alpha;
  RoundedCopy rounded;  // in X's dtype
  const int64_t* dropout_seed;  // the mask's (dropout_mask.h), with kDropout
  uint32_t dropout_threshold;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A float of cluster block `block_rank`'s shared memory, at the offset `local` has in this block's.
__device__ __forceinline__ float load_cluster_float(const float* local, uint32_t block_rank) {
  float value;
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %1, %2;\n"
      "ld.shared::cluster.f32 %0, [remote];\n"
      "}\n"
      : "=f"(value)
      : "r"(shared_address(local)), "r"(block_rank)
      : "memory");
  return value;
}

#endif

template <typename T, int RPAD, bool kNMajorW, bool kDropout>
__global__ void __launch_bounds__(threads_per_block(kDropout), 1)
    lora_shrink_sm90_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                            const ShrinkSm90Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  using Layout = ShrinkLayout<RPAD, kNMajorW>;
  constexpr int kConsumers = consumer_warpgroups(kDropout);
  constexpr int kThreads = threads_per_block(kDropout);
  // Static, so that the host can tell this image from the stub of other targets (shrink_sm90_max_splits).
  __shared__ uint64_t full[kMaxStages], empty[kMaxStages];
  extern __shared__ unsigned char shared_raw[];
  // The 128-byte swizzle pattern repeats every 1024 bytes: tiles start on a 1024-byte boundary.
  unsigned char* x_tiles =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared_raw) + 1023) & ~uintptr_t{1023});
  const int stages = p.stages;
  unsigned char* w_tiles = x_tiles + stages * kTileXBytes;

  const uint32_t splits = cluster_size(), split = cluster_block_rank();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / splits) * kTileM;
  const int kb_begin = static_cast<int>(static_cast<int64_t>(p.k_blocks) * split / splits);
  const int kb_end = static_cast<int>(static_cast<int64_t>(p.k_blocks) * (split + 1) / splits);

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbarrier_init(&full[s], 1);   // the producer's arrival (+ the copies' bytes)
      mbarrier_init(&empty[s], 1);  // the release by the consumer warpgroup that read it
    }
    fence_barrier_init();
  }
  __syncthreads();
  // Launched as a programmatic dependent (dependent_launch.h): X may be the kernel ahead's output.
  wait_for_preceding_kernel();

  float acc[RPAD / 2];
#pragma unroll
  for (int i = 0; i < RPAD / 2; ++i) acc[i] = 0.f;

  const int role = threadIdx.x / 128;  // < kConsumers: a consumer warpgroup; kConsumers: the producer warp
  if (role == kConsumers) {
    if (threadIdx.x == 128 * kConsumers) {
      prefetch_tensor_map(&x_map);
      prefetch_tensor_map(&w_map);
      int stage = 0;
      uint32_t phase = 0;
      for (int kb = kb_begin; kb < kb_end; ++kb) {
        mbarrier_wait(&empty[stage], phase ^ 1);  // passes at first use
        mbarrier_arrive_expect_bytes(&full[stage], kTileXBytes + Layout::kTileWBytes);  // whole boxes, zeros included
        copy_tile_async(x_tiles + stage * kTileXBytes, &x_map, &full[stage], kb * kTileK, static_cast<int>(m0));
        unsigned char* w_tile = w_tiles + stage * Layout::kTileWBytes;
        if constexpr (kNMajorW) {
          copy_tile_async(w_tile, &w_map, &full[stage], 0, kb * kTileK);  // (64 K rows × 64 ranks) of B
        } else {
          copy_tile_async(w_tile, &w_map, &full[stage], kb * kTileK, 0);  // (RPAD ranks × 64 K) of W
        }
        if (++stage == stages) {
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
    // With several consumer warpgroups, each takes every kConsumers-th K block and frees its stage as soon as its MMAs
    // are done. The stage count is a multiple of kConsumers, so each stage always belongs to the same warpgroup, which
    // saw every earlier phase of its barriers (another's stage could pass its parity test a phase early). Alone, the
    // warpgroup keeps one stage's MMAs in flight.
    int stage = 0, previous_stage = -1;
    uint32_t phase = 0;
    for (int kb = kb_begin; kb < kb_end; ++kb) {
      if ((kb - kb_begin) % kConsumers == consumer) {
        mbarrier_wait(&full[stage], phase);
        unsigned char* x_tile = x_tiles + stage * kTileXBytes;
        const unsigned char* w_tile = w_tiles + stage * Layout::kTileWBytes;
        if constexpr (kDropout) {
          // The tile's dropped elements zeroed in place: 512 16-byte chunks (row r, columns 8c … 8c+7, stored at
          // chunk c ^ (r % 8) of the row by the 128-byte swizzle), four per thread; the Philox draws overlap the
          // copies of the stages ahead, which need no thread. Columns past K are the copy's zeros.
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int chunk = thread + 128 * j, row = chunk / 8, c = chunk % 8;
            const int64_t column = static_cast<int64_t>(kb) * kTileK + 8 * c;
            if (column < p.k) {
              uint4* address = reinterpret_cast<uint4*>(x_tile + row * 128 + ((c ^ (row % 8)) * 16));
              *address = apply_dropout8_as_masks(*address, seed, m0 + row, column / 8, p.dropout_threshold);
            }
          }
          // These writes before the MMAs' reads: wgmma reads shared memory through the async proxy, as the copy engine
          // does (the same fence).
          fence_shared_for_copy_engine();
          asm volatile("bar.sync %0, 128;" ::"r"(1 + consumer) : "memory");  // the warpgroup's writes all done
        }
#pragma unroll
        for (int i = 0; i < RPAD / 2; ++i) fence_accumulator(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kTileK / 16; ++ks) {
          const uint64_t desc_x = swizzled_tile_descriptor(x_tile + ks * 32);
          // K-contiguous W: +32 bytes per 16 K inside the 128-byte rows; N-contiguous: 16 K rows = two 8-row atoms.
          const uint64_t desc_w = kNMajorW
                                      ? swizzled_n_major_tile_descriptor(w_tile + ks * 16 * 128, kTileK * 64 * 2)
                                      : swizzled_tile_descriptor(w_tile + ks * 32);
          wgmma_m64k16<T, RPAD, kNMajorW>(acc, desc_x, desc_w, 1);
        }
        wgmma_commit();
#pragma unroll
        for (int i = 0; i < RPAD / 2; ++i) fence_accumulator(acc[i]);
        if constexpr (kConsumers > 1) {
          wgmma_wait<0>();
          if (thread == 0) mbarrier_arrive_local(&empty[stage]);
        } else {
          // Keep this stage's MMAs in flight; the previous stage's are done now, so free that stage.
          wgmma_wait<1>();
          if (previous_stage >= 0 && thread == 0) mbarrier_arrive_local(&empty[previous_stage]);
          previous_stage = stage;
        }
      }
      if (++stage == stages) {
        stage = 0;
        phase ^= 1;
      }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < RPAD / 2; ++i) fence_accumulator(acc[i]);
  }
  // Every copy has landed and every MMA has read its stage: the X stages now hold each consumer warpgroup's partial
  // sums, (64 × RPAD) float32 row-major, one after the other.
  __syncthreads();
  float* partial = reinterpret_cast<float*>(x_tiles);
  if (role < kConsumers) {
    float* own = partial + role * kTileM * RPAD;
    const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int row = 16 * warp + lane / 4;
#pragma unroll
    for (int j = 0; j < RPAD / 8; ++j) {
      const int column = 8 * j + 2 * (lane % 4);
      *reinterpret_cast<float2*>(own + row * RPAD + column) = make_float2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<float2*>(own + (row + 8) * RPAD + column) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
  if (splits > 1) {
    cluster_sync();  // every block's partial sums are written and visible across the cluster
  } else {
    __syncthreads();
  }
  // This block writes rows [row_begin, row_end) of the tile: the sum of the cluster's partials, in rank order (and
  // consumer order within a block).
  const int row_begin = kTileM * static_cast<int>(split) / static_cast<int>(splits);
  const int row_end = kTileM * static_cast<int>(split + 1) / static_cast<int>(splits);
  T* rounded_out = static_cast<T*>(p.rounded.out);
  for (int index = row_begin * p.rank + threadIdx.x; index < row_end * p.rank; index += kThreads) {
    const int row = index / p.rank, column = index % p.rank;
    const int64_t token = m0 + row;
    if (token >= p.tokens) break;  // rows only grow with index
    float sum = 0.f;
    for (uint32_t q = 0; q < splits; ++q) {
#pragma unroll
      for (int c = 0; c < kConsumers; ++c) {
        const float* element = partial + c * kTileM * RPAD + row * RPAD + column;
        sum += splits > 1 ? load_cluster_float(element, q) : *element;
      }
    }
    const float value = p.alpha * sum;
    p.out[token * p.rank + column] = value;
    if (rounded_out != nullptr) rounded_out[token * p.rounded.pitch + column] = static_cast<T>(value * p.rounded.scale);
  }
  if (splits > 1) cluster_sync();  // no block leaves while a peer may still read its partial sums
#else
  // The other targets of a multi-architecture build: never launched (shrink_sm90_max_splits refuses them).
  (void)x_map, (void)w_map, (void)p;
  __trap();
#endif
}

// LORA_EXT_SHRINK_SM90: unset = where it pays (shrink_sm90_pays), 1 = from kShrinkSm90MinTokens at any rank, 0 = never,
// force = from one token (the tests).
enum class ShrinkSm90Setting { kOff, kAuto, kOn, kForce };
ShrinkSm90Setting shrink_sm90_setting() {
  const char* setting = std::getenv("LORA_EXT_SHRINK_SM90");
  if (setting == nullptr) return ShrinkSm90Setting::kAuto;
  if (std::strcmp(setting, "0") == 0) return ShrinkSm90Setting::kOff;
  if (std::strcmp(setting, "1") == 0) return ShrinkSm90Setting::kOn;
  if (std::strcmp(setting, "force") == 0) return ShrinkSm90Setting::kForce;
  return ShrinkSm90Setting::kAuto;
}

// Where this kernel beats the other shrinks (H100, bf16, 4096², training steps; docs/perf-notes.md v21):
// - with dropout from 4096 tokens, where its Philox draws overlap the copy engine's stream (8192 tokens, r = 16: the
//   shrink 43 → 40 µs; 4096: 29 → 23 µs); at 2048 the other shrink's many small blocks win;
// - without dropout above rank 16, where the pass is small enough for the call to be host-bound (tokens · K < 2^25,
//   8192 × 4096): it replaces cuBLAS's product and its rounding copy, and at 2048 and 4096 tokens a step took 2.93 →
//   1.87 and 1.58 → 1.20 of the base; at 8192 tokens cuBLAS's product (29 µs against 35) keeps it;
// - without dropout at ranks ≤ 16 in the same range (v23, forward calls in one process: 1024 tokens 1.45–1.47× →
//   1.37–1.38× of the base, 2048 1.30× → 1.28×, 4096 1.15× → 1.13–1.14×, r = 8 and 16; the shrink 12.5 → 9.7 µs at
//   2048). At 8192 tokens the tensor-core shrink keeps them (1.087× against 1.101× forward).
bool shrink_sm90_pays(int64_t tokens, int64_t k, bool dropout) {
  if (dropout) return tokens >= 4096;
  return tokens >= kShrinkSm90MinTokens && tokens * k < (int64_t{1} << 25);
}

// 0 where the sm_90a image of this kernel is not the one loaded on the current device; else the most blocks a K-split
// cluster of it may have there (1, 2, 4 or 8), its shared memory limit raised. Decided once per device. The other
// targets' stub has no static shared memory, the real kernel its barriers.
template <typename T, int RPAD, bool kNMajorW, bool kDropout>
int shrink_sm90_max_splits() {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> decided{};  // 0: not yet; -1: not loaded; > 0: max splits
  const int device = c10::cuda::current_device();
  std::atomic<int>* slot = device < kMaxDevices ? &decided[device] : nullptr;
  if (slot != nullptr && slot->load() != 0) return std::max(slot->load(), 0);
  auto kernel = lora_shrink_sm90_kernel<T, RPAD, kNMajorW, kDropout>;
  const cudaError_t pending = cudaPeekAtLastError();  // not ours to clear
  cudaFuncAttributes attributes{};
  bool loaded = tensor_map_encoder() != nullptr && cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
                attributes.sharedSizeBytes > 0;
  if (loaded) {
    using Layout = ShrinkLayout<RPAD, kNMajorW>;
    loaded = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Layout::shared_bytes(Layout::kStagesLimit)) == cudaSuccess;
  }
  int max_splits = 0;
  if (loaded) {
    // The largest K-split cluster this GPU can place (a partitioned GPU may take none of 8 blocks).
    using Layout = ShrinkLayout<RPAD, kNMajorW>;
    for (int splits = kMaxSplits; splits >= 2 && max_splits == 0; splits /= 2) {
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(static_cast<unsigned>(splits));
      config.blockDim = dim3(threads_per_block(kDropout));
      config.dynamicSmemBytes = Layout::shared_bytes(default_stages(kDropout));
      cudaLaunchAttribute cluster = cluster_along_x(static_cast<unsigned>(splits));
      config.attrs = &cluster;
      config.numAttrs = 1;
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0) {
        max_splits = splits;
      }
    }
    if (max_splits == 0) max_splits = 1;
  }
  if (pending == cudaSuccess) (void)cudaGetLastError();  // a refused query is an answer (the caller's paths run)
  if (slot != nullptr) slot->store(loaded ? max_splits : -1);
  return loaded ? max_splits : 0;
}

// How many blocks of a cluster split K: row tiles × splits should fill ≈ 0.9 of the SMs, each block keeping ≥ 16 K
// blocks.
int k_splits(int64_t row_tiles, int k_blocks, int sms) {
  int splits = 1;
  while (splits < kMaxSplits && row_tiles * splits * 10 < static_cast<int64_t>(sms) * 9 && k_blocks >= 32 * splits) {
    splits *= 2;
  }
  return splits;
}

struct DropoutArgs {
  const int64_t* seed;  // nullptr: no dropout
  uint32_t threshold;
};

template <typename T, int RPAD, bool kNMajorW, bool kDropout>
bool launch_shrink_sm90(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_rk, double alpha,
                        const RoundedCopy& rounded, DropoutArgs dropout) {
  const int max_splits = shrink_sm90_max_splits<T, RPAD, kNMajorW, kDropout>();
  if (max_splits == 0) return false;
  const int64_t tokens = x.size(0), k = x.size(1), rank = w_rk.size(0);
  const CUtensorMap x_map = swizzled_tile_map(x.data_ptr(), x.scalar_type(), tokens, k, x.stride(0), kTileM);
  CUtensorMap w_map;
  if constexpr (kNMajorW) {
    // W = Bᵀ: B (K × r) as it lies, rows w_rk.stride(1) apart; (64 K × 64 ranks) boxes.
    w_map = swizzled_tile_map(w_rk.data_ptr(), w_rk.scalar_type(), k, rank, w_rk.stride(1), kTileK);
  } else {
    // One rank: its row stride is never stepped, so any valid pitch serves.
    const int64_t row_stride = rank == 1 ? (k + 7) / 8 * 8 : w_rk.stride(0);
    w_map = swizzled_tile_map(w_rk.data_ptr(), w_rk.scalar_type(), rank, k, row_stride, RPAD);
  }
  using Layout = ShrinkLayout<RPAD, kNMajorW>;
  ShrinkSm90Params p{};
  p.out = out.data_ptr<float>();
  p.tokens = tokens;
  p.rank = static_cast<int>(rank);
  p.k = k;
  p.k_blocks = static_cast<int>((k + kTileK - 1) / kTileK);
  p.stages = default_stages(kDropout);
  if (const char* setting = std::getenv("LORA_EXT_SHRINK_SM90_STAGES")) {
    p.stages = std::min(std::max(std::atoi(setting), Layout::min_stages(kDropout)), Layout::kStagesLimit);
    p.stages -= p.stages % consumer_warpgroups(kDropout);  // each stage owned by one consumer warpgroup (the kernel)
  }
  p.alpha = static_cast<float>(alpha);
  p.rounded = rounded;
  p.dropout_seed = dropout.seed;
  p.dropout_threshold = dropout.threshold;
  const int64_t row_tiles = (tokens + kTileM - 1) / kTileM;
  const int splits = std::min(k_splits(row_tiles, p.k_blocks, at::cuda::getCurrentDeviceProperties()->multiProcessorCount),
                              max_splits);

  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(row_tiles * splits));
  config.blockDim = dim3(threads_per_block(kDropout));
  config.dynamicSmemBytes = Layout::shared_bytes(p.stages);
  config.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attributes[2];
  unsigned count = 0;
  if (splits > 1) attributes[count++] = cluster_along_x(static_cast<unsigned>(splits));
  // The loaded image is sm_90a (checked above), whose wait is real: no dependent_launch_supported() needed.
  if (dependent_launch_wanted() && dependent_launch_enabled()) attributes[count++] = programmatic_stream_serialization();
  config.attrs = attributes;
  config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, lora_shrink_sm90_kernel<T, RPAD, kNMajorW, kDropout>, x_map, w_map, p));
  return true;
}

// How the copy engine can read W (r × K): rows along K (16-byte pitch), or W = Bᵀ of a row-major B (r % 8 == 0); with
// `check_address`, from a 16-byte-aligned start.
enum class WLayout { kNone, kKContiguous, kNContiguous };
WLayout w_layout(const at::Tensor& w_rk, bool check_address) {
  const int64_t rank = w_rk.size(0), k = w_rk.size(1);
  const bool aligned = !check_address || reinterpret_cast<uintptr_t>(w_rk.data_ptr()) % 16 == 0;
  if (w_rk.stride(1) == 1 && aligned && (rank == 1 || (w_rk.stride(0) % 8 == 0 && w_rk.stride(0) >= k))) {
    return WLayout::kKContiguous;
  }
  if (w_rk.stride(0) == 1 && aligned && rank % 8 == 0 && w_rk.stride(1) % 8 == 0 && w_rk.stride(1) >= rank) {
    return WLayout::kNContiguous;
  }
  return WLayout::kNone;
}

// The instantiation for w_rk's layout and rank, or false where none takes it. Dropout (on X) serves the forward's
// x·Aᵀ only: K-contiguous W.
bool launch_for_layout(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_rk, double alpha,
                       const RoundedCopy& rounded, DropoutArgs dropout) {
  const int64_t rank = w_rk.size(0);
  const auto dtype = x.scalar_type();
  const WLayout layout = w_layout(w_rk, /*check_address=*/true);
  const bool n_contiguous = layout == WLayout::kNContiguous;
  if (layout == WLayout::kNone || (n_contiguous && dropout.seed != nullptr)) return false;

  auto typed = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (dropout.seed != nullptr) {
      if (rank <= 16) return launch_shrink_sm90<T, 16, false, true>(out, x, w_rk, alpha, rounded, dropout);
      if (rank <= 32) return launch_shrink_sm90<T, 32, false, true>(out, x, w_rk, alpha, rounded, dropout);
      return launch_shrink_sm90<T, 64, false, true>(out, x, w_rk, alpha, rounded, dropout);
    }
    if (n_contiguous) return launch_shrink_sm90<T, 64, true, false>(out, x, w_rk, alpha, rounded, dropout);
    if (rank <= 16) return launch_shrink_sm90<T, 16, false, false>(out, x, w_rk, alpha, rounded, dropout);
    if (rank <= 32) return launch_shrink_sm90<T, 32, false, false>(out, x, w_rk, alpha, rounded, dropout);
    return launch_shrink_sm90<T, 64, false, false>(out, x, w_rk, alpha, rounded, dropout);
  };
  return dtype == at::kBFloat16 ? typed(at::BFloat16{}) : typed(at::Half{});
}

}  // namespace

bool shrink_sm90(at::Tensor& out, const at::Tensor& x, const at::Tensor& w_rk, double alpha, const RoundedCopy& rounded,
                 const int64_t* dropout_seed, uint32_t dropout_threshold) {
  const ShrinkSm90Setting setting = shrink_sm90_setting();
  const int64_t tokens = x.size(0), k = x.size(1), rank = w_rk.size(0);
  switch (setting) {
    case ShrinkSm90Setting::kOff:
      return false;
    case ShrinkSm90Setting::kAuto:
      if (!shrink_sm90_pays(tokens, k, dropout_seed != nullptr)) return false;
      break;
    case ShrinkSm90Setting::kOn:
      if (tokens < kShrinkSm90MinTokens) return false;
      break;
    case ShrinkSm90Setting::kForce:
      if (tokens < 1) return false;
      break;
  }
  const auto dtype = x.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (w_rk.scalar_type() != dtype && w_rk.scalar_type() != at::kFloat) return false;
  if (rank < 1 || rank > 64 || k < 1 || w_rk.size(1) != k) return false;
  // Copy coordinates are 32-bit.
  if (tokens > INT32_MAX - kTileM || k > INT32_MAX - kTileK) return false;
  if (!out.is_contiguous() || out.scalar_type() != at::kFloat) return false;
  if (!copy_engine_rows(x)) return false;
  const auto* properties = at::cuda::getDeviceProperties(x.get_device());
  if (properties->major != 9 || properties->minor != 0) return false;
  // Float32 adapters rounded to x's dtype first (a small copy, with the view's strides where it is dense), as the
  // other shrinks round them when staging; not made where the copy's layout would not serve either.
  if (w_rk.scalar_type() != dtype) {
    // (a dense view keeps its strides through .to(); any other becomes contiguous: rows of K elements)
    const bool copy_serves = w_rk.is_non_overlapping_and_dense() ? w_layout(w_rk, false) != WLayout::kNone
                                                                 : (rank == 1 || k % 8 == 0);
    if (!copy_serves) return false;
  }
  const at::Tensor w = w_rk.scalar_type() == dtype ? w_rk : w_rk.to(dtype);
  return launch_for_layout(out, x, w, alpha, rounded, DropoutArgs{dropout_seed, dropout_threshold});
}

}  // namespace cuda
}  // namespace lora_ext

#else  // no sm_90a target in this build: the other shrinks serve

namespace lora_ext {
namespace cuda {

bool shrink_sm90(at::Tensor&, const at::Tensor&, const at::Tensor&, double, const RoundedCopy&, const int64_t*, uint32_t) {
  return false;
}

}  // namespace cuda
}  // namespace lora_ext

#endif  // LORA_EXT_HAS_SM90A
