// y = x·Wᵀ + b + xs·Bᵀ on Hopper as one GEMM (lora_gemm_sm90.h says why). The design is the standard
// warp-specialised Hopper GEMM, kept small:
//
// - Tiles of 128 (tokens) × 256 (out), 64 along K per pipeline stage, 4 stages (192 KB of shared memory).
// - One producer warpgroup: a single thread issues the bulk tensor copies (TMA) of x's and W's tiles into the
//   stages, 128-byte swizzled, each stage completing on its `full` mbarrier.
// - Two consumer warpgroups, 64 rows each: per stage four wgmma.m64n256k16 into 128 float32 registers per thread,
//   then free the stage (its `empty` mbarrier) once those MMAs have read it.
// - The rank-r term is ⌈r/64⌉ more K blocks of the same loop, copied from xs and B instead of x and W; the copy
//   engine fills the columns past r with zeros, so they add nothing.
// - Persistent: one block per SM walks the tiles (in groups of 16 row tiles, so the tiles in flight share x's and
//   W's rows in L2); the producer runs ahead into the next tile while the consumers store this one.
// - Epilogue: + bias in float32, one rounding to x's dtype, stored straight from the accumulator registers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdlib>
#include <cstring>

#include "../error_message.h"
#include "lora_gemm_sm90.h"
#include "sm90_primitives.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kTileM = 128, kTileN = 256, kTileK = 64, kStages = 4;
constexpr int kThreads = 384;  // warpgroup 0 produces, 1 and 2 consume
constexpr int kTileXBytes = kTileM * kTileK * 2;  // 16 KB
constexpr int kTileWBytes = kTileN * kTileK * 2;  // 32 KB
constexpr int kStageBytes = kTileXBytes + kTileWBytes;
constexpr int kSharedBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;  // + barriers + alignment slack
#if defined(LORA_EXT_HAS_SM90A)
// Below this many tokens cuBLAS plus the expand kernel stays (the persistent grid has too few tiles to fill the
// GPU and cuBLAS's small-M kernels win); measured on an H100, docs/perf-notes.md v8.
constexpr int64_t kMinTokens = 1024;
#endif

struct GemmShape {
  int64_t tokens, out;      // M, N
  int base_k_blocks;        // ⌈in / 64⌉
  int lora_k_blocks;        // ⌈r / 64⌉
  int row_tiles, column_tiles;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kGroupRowTiles = 16;

// The tile a block works on, grouped so that the tiles in flight at once share rows of x and W in L2.
__device__ __forceinline__ void tile_origin(int tile, const GemmShape& s, int& m0, int& n0) {
  const int per_group = kGroupRowTiles * s.column_tiles;
  const int first_row_tile = (tile / per_group) * kGroupRowTiles;
  const int rows_in_group = min(s.row_tiles - first_row_tile, kGroupRowTiles);
  const int in_group = tile % per_group;
  m0 = (first_row_tile + in_group % rows_in_group) * kTileM;
  n0 = (in_group / rows_in_group) * kTileN;
}
#endif

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    lora_gemm_sm90_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                          const __grid_constant__ CUtensorMap xs_map, const __grid_constant__ CUtensorMap b_map,
                          T* __restrict__ y, const T* __restrict__ bias, const GemmShape shape) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  extern __shared__ unsigned char shared_raw[];
  // The 128-byte swizzle pattern repeats every 1024 bytes: tiles start on a 1024-byte boundary.
  unsigned char* shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(shared + kStages * kStageBytes);
  uint64_t* empty = full + kStages;

  const int warpgroup = threadIdx.x / 128, thread = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);   // the producer's arrival (+ the copies' bytes)
      mbarrier_init(&empty[s], 2);  // one arrival per consumer warpgroup
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int tiles = shape.row_tiles * shape.column_tiles;
  const int k_blocks = shape.base_k_blocks + shape.lora_k_blocks;

  if (warpgroup == 0) {
    release_registers<40>();
    if (thread == 0) {
      prefetch_tensor_map(&x_map);
      prefetch_tensor_map(&w_map);
      prefetch_tensor_map(&xs_map);
      prefetch_tensor_map(&b_map);
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int m0, n0;
        tile_origin(tile, shape, m0, n0);
        for (int kb = 0; kb < k_blocks; ++kb) {
          mbarrier_wait(&empty[stage], phase ^ 1);  // the consumers have freed this stage (passes at first use)
          unsigned char* x_tile = shared + stage * kStageBytes;
          unsigned char* w_tile = x_tile + kTileXBytes;
          mbarrier_arrive_expect_bytes(&full[stage], kStageBytes);  // whole boxes, zero-filled parts included
          if (kb < shape.base_k_blocks) {
            copy_tile_async(x_tile, &x_map, &full[stage], kb * kTileK, m0);
            copy_tile_async(w_tile, &w_map, &full[stage], kb * kTileK, n0);
          } else {
            const int k0 = (kb - shape.base_k_blocks) * kTileK;
            copy_tile_async(x_tile, &xs_map, &full[stage], k0, m0);
            copy_tile_async(w_tile, &b_map, &full[stage], k0, n0);
          }
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    claim_registers<232>();
    const int consumer = warpgroup - 1;  // rows 64·consumer … +63 of the tile
    float acc[128];
    int stage = 0;
    uint32_t phase = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int m0, n0;
      tile_origin(tile, shape, m0, n0);
      int previous_stage = -1;
      for (int kb = 0; kb < k_blocks; ++kb) {
        mbarrier_wait(&full[stage], phase);
        const unsigned char* x_tile = shared + stage * kStageBytes + consumer * 64 * 128;
        const unsigned char* w_tile = shared + stage * kStageBytes + kTileXBytes;
#pragma unroll
        for (int i = 0; i < 128; ++i) fence_accumulator(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kTileK / 16; ++ks) {
          const uint64_t desc_x = swizzled_tile_descriptor(x_tile + ks * 32);
          const uint64_t desc_w = swizzled_tile_descriptor(w_tile + ks * 32);
          if constexpr (std::is_same_v<T, at::BFloat16>) {
            wgmma_m64n256k16_bf16(acc, desc_x, desc_w, (kb > 0 || ks > 0) ? 1 : 0);
          } else {
            wgmma_m64n256k16_f16(acc, desc_x, desc_w, (kb > 0 || ks > 0) ? 1 : 0);
          }
        }
        wgmma_commit();
#pragma unroll
        for (int i = 0; i < 128; ++i) fence_accumulator(acc[i]);
        // Keep this stage's MMAs in flight; the previous stage's are done now, so free that stage.
        wgmma_wait<1>();
        if (previous_stage >= 0 && thread == 0) mbarrier_arrive(&empty[previous_stage]);
        previous_stage = stage;
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 128; ++i) fence_accumulator(acc[i]);
      if (thread == 0) mbarrier_arrive(&empty[previous_stage]);

      // Epilogue. Accumulator layout of m64n256: thread (warp w, lane l) holds, for each 8-column block j,
      // rows 16w + l/4 (+8) and columns 8j + 2(l%4) (+1) in acc[4j .. 4j+3].
      const int warp = thread / 32, lane = thread % 32;
      const int64_t row = m0 + consumer * 64 + warp * 16 + lane / 4;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int64_t column = n0 + j * 8 + (lane % 4) * 2;
        if (column >= shape.out) continue;  // out is a multiple of 8: both columns of the pair are in or out
        float bias0 = 0.f, bias1 = 0.f;
        if (bias != nullptr) {
          bias0 = static_cast<float>(bias[column]);
          bias1 = static_cast<float>(bias[column + 1]);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t r = row + half * 8;
          if (r < shape.tokens) {
            T pair[2] = {static_cast<T>(acc[4 * j + 2 * half] + bias0), static_cast<T>(acc[4 * j + 2 * half + 1] + bias1)};
            *reinterpret_cast<uint32_t*>(y + r * shape.out + column) = *reinterpret_cast<const uint32_t*>(pair);
          }
        }
      }
    }
  }
#else
  (void)x_map, (void)w_map, (void)xs_map, (void)b_map, (void)y, (void)bias, (void)shape;
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault,
                                                    &found));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &function, cudaEnableDefault, &found));
#endif
    LORA_CHECK(found == cudaDriverEntryPointSuccess && function != nullptr,
               "lora_ext: the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12 or newer)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  return encode;
}

// Tensor map of a (rows × columns) row-major 16-bit matrix, read in (box_rows × 64) boxes, 128-byte swizzled.
CUtensorMap tile_map(const at::Tensor& t, int64_t columns, uint32_t box_rows) {
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(columns), static_cast<cuuint64_t>(t.size(0))};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(t.stride(0)) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kTileK), box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      t.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult result = tensor_map_encoder()(&map, type, 2, t.data_ptr(), dims, strides, box, element_strides,
                                               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  LORA_CHECK(result == CUDA_SUCCESS, "lora_ext: cuTensorMapEncodeTiled failed (", static_cast<int>(result),
             ") for a ", t.sizes(), " tensor with strides ", t.strides());
  return map;
}

bool copy_engine_rows(const at::Tensor& t) {
  return t.dim() == 2 && t.stride(1) == 1 && t.stride(0) % 8 == 0 && t.stride(0) >= t.size(1) &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

#if defined(LORA_EXT_HAS_SM90A)
bool fused_gemm_enabled() {  // opt-in while it is slower than cuBLAS + expand at 4096 wide (perf-notes v8)
  const char* setting = std::getenv("LORA_EXT_FUSED_GEMM");
  return setting != nullptr && std::strcmp(setting, "1") == 0;
}
#endif

}  // namespace

bool fused_lora_gemm_usable(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            int64_t rank) {
#if defined(LORA_EXT_HAS_SM90A)
  if (!fused_gemm_enabled()) return false;
  const auto dtype = x.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (weight.scalar_type() != dtype || (bias.has_value() && bias->defined() && bias->scalar_type() != dtype)) return false;
  if (x.size(0) < kMinTokens || rank < 1) return false;
  if (x.size(1) % 8 != 0 || weight.size(0) % 8 != 0) return false;
  if (x.size(0) > INT32_MAX || weight.size(0) > INT32_MAX) return false;
  if (!copy_engine_rows(x) || !copy_engine_rows(weight)) return false;
  if (bias.has_value() && bias->defined() && !bias->is_contiguous()) return false;
  const auto* properties = at::cuda::getDeviceProperties(x.get_device());
  return properties->major == 9 && properties->minor == 0;
#else
  (void)x, (void)weight, (void)bias, (void)rank;
  return false;
#endif
}

at::Tensor lora_gemm_operand(const at::Tensor& t, at::ScalarType dtype, double scale) {
  const int64_t rank = t.size(1);
  if (scale == 1.0 && t.scalar_type() == dtype && copy_engine_rows(t)) return t;
  const int64_t pitch = (rank + 7) / 8 * 8;
  at::Tensor padded = at::empty({t.size(0), pitch}, t.options().dtype(dtype));
  at::Tensor view = padded.narrow(1, 0, rank);
  if (scale == 1.0) {
    view.copy_(t);
  } else {
    at::mul_out(view, t, at::scalar_tensor(scale, t.options().dtype(at::kDouble).device(at::kCPU)));
  }
  return view;
}

at::Tensor fused_lora_gemm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& xs, const at::Tensor& lora_B) {
  const int64_t tokens = x.size(0), in = x.size(1), out = weight.size(0), rank = xs.size(1);
  at::Tensor y = at::empty({tokens, out}, x.options());
  if (tokens == 0) return y;
  TORCH_INTERNAL_ASSERT(copy_engine_rows(xs) && copy_engine_rows(lora_B) && xs.scalar_type() == x.scalar_type() &&
                        lora_B.scalar_type() == x.scalar_type() && lora_B.size(1) == rank);
  const CUtensorMap x_map = tile_map(x, in, kTileM), w_map = tile_map(weight, in, kTileN);
  const CUtensorMap xs_map = tile_map(xs, rank, kTileM), b_map = tile_map(lora_B, rank, kTileN);
  GemmShape shape;
  shape.tokens = tokens;
  shape.out = out;
  shape.base_k_blocks = static_cast<int>((in + kTileK - 1) / kTileK);
  shape.lora_k_blocks = static_cast<int>((rank + kTileK - 1) / kTileK);
  shape.row_tiles = static_cast<int>((tokens + kTileM - 1) / kTileM);
  shape.column_tiles = static_cast<int>((out + kTileN - 1) / kTileN);
  const int tiles = shape.row_tiles * shape.column_tiles;
  const int blocks = std::min(tiles, at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool has_bias = bias.has_value() && bias->defined();
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    auto kernel = lora_gemm_sm90_kernel<T>;
    // Per call rather than cached: the attribute belongs to the current device's copy of the kernel.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes));
    kernel<<<blocks, kThreads, kSharedBytes, stream>>>(x_map, w_map, xs_map, b_map, y.data_ptr<T>(),
                                                       has_bias ? bias->data_ptr<T>() : nullptr, shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x.scalar_type() == at::kBFloat16) {
    launch(at::BFloat16{});
  } else {
    launch(at::Half{});
  }
  return y;
}

}  // namespace cuda
}  // namespace lora_ext
