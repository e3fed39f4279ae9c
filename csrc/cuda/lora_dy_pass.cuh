// The backward's two products of dy in one pass over dy, on tensor cores (16-bit dy, r ≤ 16):
//   dxa = s · dy·B      (tokens × r, float32)
//   dB  = s · dyᵀ·xa    (out × r, the adapter's dtype)
// Separately (the shrink, then the token reduction) they read dy twice: 64 MB each at 8192 × 4096 bf16.
//
// Grid: x over groups of kGroupTiles 256-column tiles of dy, y over token splits. Block: 8 warps. For each column
// tile of its group the block stages B's 256 rows, then walks its tokens 32 at a time, staging dy (32 × 256, 16-byte
// loads, the next step's issued before this step's MMAs) and xa (32 × r, rounded to dy's type as the token reduction
// does). Each warp owns 32 columns: it accumulates dB for them over the split's tokens (as the token reduction) and
// multiplies its dy slice by B's rows for them into 32 tokens × r, which the block adds over its warps in order into
// a float32 dxa sum for its split's tokens in shared memory. Each block then writes float32 partials: dB per split
// (splits × C_pad × 16) and dxa per column group (groups × T_pad × 16). finalize_token_reduce_kernel adds each
// over splits / groups in a fixed order and writes dB and dxa, so results repeat bit for bit.
// Bytes: dy once; xa and B from L2 (once per column tile / per split); partials 64·(splits·C + groups·T) bytes,
// written once and read once (≈ 12 MB at 8192 × 4096, against the 64 MB read of dy it saves).
#pragma once

#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <mma.h>

#include <mutex>

#include "lora_token_reduce_wmma.cuh"
#include "wmma_tiles.cuh"

namespace lora_ext {
namespace cuda {

struct DyPassParams {
  const void* dy;  // (tokens × C), unit column stride
  int64_t dy_stride_t;
  const void* b;  // B (C × r), rank-contiguous rows
  int64_t b_stride_c;
  bool b_vector_rows;  // B's rows can be read 8 ranks per 16-byte load
  const float* xa;     // (tokens × r), contiguous
  bool xa_vector_rows;
  float* partials_b;    // (splits × C_pad × 16)
  float* partials_dxa;  // (groups × T_pad × 16)
  int64_t tokens, columns, rank, tokens_per_split, columns_padded, tokens_padded;
  float alpha;
};

namespace dy_pass_detail {
constexpr int kRankPad = 16;  // r ≤ 16
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kCols = 32 * kWarps;  // columns per tile: 32 per warp
constexpr int kGroupTiles = 2;
constexpr int kTokens = 32;   // tokens per step
constexpr int kMaxSplitTokens = 256;
constexpr int kPitch = kCols + 8;
constexpr int kRankPitch = kRankPad + 8;
// Shared memory (dynamic: more than the 48 KB a static allocation may take), in this order.
constexpr size_t kDyBytes = sizeof(uint16_t) * kTokens * kPitch;
constexpr size_t kXaBytes = sizeof(uint16_t) * kTokens * kRankPitch;
constexpr size_t kBBytes = sizeof(uint16_t) * kCols * kRankPitch;
constexpr size_t kScratchBytes = sizeof(float) * kWarps * kTokens * kRankPad;
constexpr size_t kSumBytes = sizeof(float) * kMaxSplitTokens * kRankPad;
constexpr size_t kSharedBytes = kDyBytes + kXaBytes + kBBytes + kScratchBytes + kSumBytes;
static_assert((kTokens * kRankPad) % kThreads == 0 && (kMaxSplitTokens * kRankPad) % kThreads == 0,
              "each dxa_sum element is read and written by one thread only");
static_assert(kDyBytes % 32 == 0 && kXaBytes % 32 == 0 && kBBytes % 32 == 0 && kScratchBytes % 32 == 0,
              "every buffer starts 32-byte aligned (wmma)");
}  // namespace dy_pass_detail

template <typename T, typename TB>
__global__ void __launch_bounds__(dy_pass_detail::kThreads) lora_dy_pass_kernel(const DyPassParams p) {
  using namespace dy_pass_detail;
  using namespace nvcuda;
  using MmaT = typename WmmaType<T>::type;
  constexpr int RPAD = kRankPad;
  static_assert(sizeof(T) == sizeof(uint16_t), "16-bit dy");
  extern __shared__ __align__(128) unsigned char shared_raw[];
  auto dy_tile = reinterpret_cast<T(*)[kPitch]>(shared_raw);
  auto xa_tile = reinterpret_cast<T(*)[kRankPitch]>(shared_raw + kDyBytes);
  auto b_tile = reinterpret_cast<T(*)[kRankPitch]>(shared_raw + kDyBytes + kXaBytes);  // B's rows: (columns × ranks)
  // each warp's share of dxa for the step
  auto scratch = reinterpret_cast<float(*)[kTokens][RPAD]>(shared_raw + kDyBytes + kXaBytes + kBBytes);
  auto dxa_sum = reinterpret_cast<float(*)[RPAD]>(shared_raw + kDyBytes + kXaBytes + kBBytes + kScratchBytes);

  const int warp = threadIdx.x / 32;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * p.tokens_per_split;
  const int64_t t_end = min(p.tokens, t_begin + p.tokens_per_split);
  const T* dy = static_cast<const T*>(p.dy);
  const TB* b = static_cast<const TB*>(p.b);

  for (int i = threadIdx.x; i < kMaxSplitTokens * RPAD; i += kThreads) (&dxa_sum[0][0])[i] = 0.f;

  constexpr int kLoads = kTokens * kCols / 8 / kThreads;
  uint4 dy_next[kLoads];
  for (int tile = 0; tile < kGroupTiles; ++tile) {
    const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kGroupTiles + tile) * kCols;
    if (c0 >= p.columns) break;  // the same for the whole block
    auto load_dy = [&](int64_t t0) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int v = threadIdx.x + kThreads * i, r = v / (kCols / 8), c = (v % (kCols / 8)) * 8;
        const int64_t t = t0 + r, col = c0 + c;
        dy_next[i] = (t < t_end && col < p.columns) ? *reinterpret_cast<const uint4*>(dy + t * p.dy_stride_t + col)
                                                    : make_uint4(0, 0, 0, 0);
      }
    };
    if (t_begin < t_end) load_dy(t_begin);
    // B's rows c0 … c0+255, ranks past r (and rows past C) zero. The previous tile's last MMAs read b_tile before
    // the barrier that ended its last step.
    for (int v = threadIdx.x; v < kCols * (RPAD / 8); v += kThreads) {
      const int n = v / (RPAD / 8), j = (v % (RPAD / 8)) * 8;
      uint4 bits = make_uint4(0, 0, 0, 0);
      if (c0 + n < p.columns && j < p.rank) {
        bits = load8_ranks_as<T>(b + (c0 + n) * p.b_stride_c, j, p.rank, p.b_vector_rows);
      }
      *reinterpret_cast<uint4*>(&b_tile[n][j]) = bits;
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> grad_b[2];
    wmma::fill_fragment(grad_b[0], 0.f);
    wmma::fill_fragment(grad_b[1], 0.f);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokens) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int v = threadIdx.x + kThreads * i, r = v / (kCols / 8), c = (v % (kCols / 8)) * 8;
        *reinterpret_cast<uint4*>(&dy_tile[r][c]) = dy_next[i];
      }
      if (t0 + kTokens < t_end) load_dy(t0 + kTokens);
      for (int v = threadIdx.x; v < kTokens * (RPAD / 8); v += kThreads) {
        const int r = v / (RPAD / 8), j = (v % (RPAD / 8)) * 8;
        const int64_t t = t0 + r;
        uint4 bits = make_uint4(0, 0, 0, 0);
        if (t < t_end && j < p.rank) bits = load8_ranks_as<T>(p.xa + t * p.rank, j, p.rank, p.xa_vector_rows);
        *reinterpret_cast<uint4*>(&xa_tile[r][j]) = bits;
      }
      __syncthreads();  // dy, xa and B staged; the previous step's dxa sums are done with `scratch`

      // dB for this warp's 32 columns: dyᵀ (columns × tokens, dy's tile read column-major) · xa.
#pragma unroll
      for (int kt = 0; kt < kTokens; kt += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MmaT, wmma::row_major> xa_fragment;
        wmma::load_matrix_sync(xa_fragment, reinterpret_cast<const MmaT*>(&xa_tile[kt][0]), kRankPitch);
#pragma unroll
        for (int cf = 0; cf < 2; ++cf) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, MmaT, wmma::col_major> dy_t;
          wmma::load_matrix_sync(dy_t, reinterpret_cast<const MmaT*>(&dy_tile[kt][warp * 32 + cf * 16]), kPitch);
          wmma::mma_sync(grad_b[cf], dy_t, xa_fragment, grad_b[cf]);
        }
      }
      // dxa over this warp's 32 columns: dy (tokens × columns) · B's rows (columns × ranks).
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> part[2];
      wmma::fill_fragment(part[0], 0.f);
      wmma::fill_fragment(part[1], 0.f);
#pragma unroll
      for (int kc = 0; kc < 32; kc += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MmaT, wmma::row_major> b_fragment;
        wmma::load_matrix_sync(b_fragment, reinterpret_cast<const MmaT*>(&b_tile[warp * 32 + kc][0]), kRankPitch);
#pragma unroll
        for (int tf = 0; tf < 2; ++tf) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, MmaT, wmma::row_major> dy_rows;
          wmma::load_matrix_sync(dy_rows, reinterpret_cast<const MmaT*>(&dy_tile[tf * 16][warp * 32 + kc]), kPitch);
          wmma::mma_sync(part[tf], dy_rows, b_fragment, part[tf]);
        }
      }
#pragma unroll
      for (int tf = 0; tf < 2; ++tf) {
        wmma::store_matrix_sync(&scratch[warp][tf * 16][0], part[tf], RPAD, wmma::mem_row_major);
      }
      __syncthreads();  // every warp's share is in `scratch`; dy and xa may be restaged
      for (int i = threadIdx.x; i < kTokens * RPAD; i += kThreads) {
        const int r = i / RPAD, j = i % RPAD;
        if (t0 + r >= t_end) continue;
        float step = scratch[0][r][j];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) step += scratch[w][r][j];  // in warp order
        // The thread handling flat index f = (token − t_begin)·16 + j is f % kThreads in every loop over dxa_sum
        // (kTokens·16 is a multiple of kThreads): it alone reads and writes that element, so no barrier is needed.
        dxa_sum[t0 - t_begin + r][j] += step;
      }
    }

    // This split's dB partial for the tile's columns (all 16 rank columns; finalize reads the first r).
    float* out = p.partials_b + static_cast<int64_t>(blockIdx.y) * p.columns_padded * RPAD;
#pragma unroll
    for (int cf = 0; cf < 2; ++cf) {
#pragma unroll
      for (int e = 0; e < grad_b[cf].num_elements; ++e) grad_b[cf].x[e] *= p.alpha;
      wmma::store_matrix_sync(out + (c0 + warp * 32 + cf * 16) * RPAD, grad_b[cf], RPAD, wmma::mem_row_major);
    }
  }

  // This column group's dxa partial for the split's tokens. Each (row, rank) was summed by the thread writing it.
  float* out = p.partials_dxa + static_cast<int64_t>(blockIdx.x) * p.tokens_padded * RPAD;
  for (int i = threadIdx.x; i < kMaxSplitTokens * RPAD; i += kThreads) {
    const int r = i / RPAD, j = i % RPAD;
    if (t_begin + r < t_end) out[(t_begin + r) * RPAD + j] = p.alpha * dxa_sum[r][j];
  }
}

// Whether the one-pass kernel can take dy, B and xa (else the shrink and the token reduction run separately).
inline bool dy_pass_supported(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& activation) {
  const auto dtype = grad_y.scalar_type();
  if (!(dtype == at::kHalf || dtype == at::kBFloat16)) return false;
  if (lora_B.scalar_type() != dtype && lora_B.scalar_type() != at::kFloat) return false;
  const int64_t rank = lora_B.size(1);
  if (rank < 1 || rank > dy_pass_detail::kRankPad) return false;
  if (activation.scalar_type() != at::kFloat || !activation.is_contiguous() || !aligned16(activation.data_ptr())) {
    return false;
  }
  if (lora_B.stride(1) != 1 && rank != 1) return false;  // B's rows are read along the ranks
  if (at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin < dy_pass_detail::kSharedBytes) return false;
  // Measured on an H100 (docs/perf-notes.md v11): ahead of the two passes at out = 4096 (fwd+bwd 1.235× against
  // 1.255×, r = 4 and with dropout too), behind at out = 11008 (1.128× against 1.102×), where its 22 column groups
  // write 35 MB of partials. So it serves up to 4096 columns. Below 1024 columns the partials (16 KB per split and
  // 256-column tile, whatever the tile's width) grow against dy itself, so the two passes keep those (not measured).
  if (grad_y.size(1) > 4096 || grad_y.size(1) < 1024) return false;
  // The grid's y dimension holds the token splits (≤ 256 tokens each).
  if (grad_y.size(0) > int64_t{65535} * dy_pass_detail::kMaxSplitTokens) return false;
  return grad_y.size(1) % 8 == 0 && grad_y.stride(1) == 1 && (grad_y.size(0) <= 1 || grad_y.stride(0) % 8 == 0) &&
         aligned16(grad_y.data_ptr());
}

// grad_activation (tokens × r, float32, contiguous) = alpha · dy·B and grad_B (C × r, any floating dtype and
// strides) = alpha · dyᵀ·xa, each summed in float32 and rounded once.
template <typename T, typename TB>
void launch_dy_pass(at::Tensor& grad_activation, at::Tensor& grad_B, const at::Tensor& grad_y, const at::Tensor& lora_B,
                    const at::Tensor& activation, double alpha) {
  using namespace dy_pass_detail;
  const int64_t tokens = grad_y.size(0), columns = grad_y.size(1), rank = lora_B.size(1);
  if (columns == 0) {
    grad_activation.zero_();
    return;
  }
  if (tokens == 0) {
    grad_B.zero_();
    return;
  }
  const int64_t groups = (columns + kGroupTiles * kCols - 1) / (kGroupTiles * kCols);
  // About two blocks (16 warps) per SM: more splits would add partials (64·C bytes per split) faster than speed.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t tokens_per_split = (tokens * groups + 2 * sms - 1) / (2 * sms);
  tokens_per_split = std::min<int64_t>(kMaxSplitTokens, std::max<int64_t>(kTokens, (tokens_per_split + kTokens - 1) / kTokens * kTokens));
  const int64_t splits = (tokens + tokens_per_split - 1) / tokens_per_split;
  // The kernel's one-owner-per-dxa_sum-element argument needs whole 32-token steps and at most kMaxSplitTokens.
  TORCH_INTERNAL_ASSERT(tokens_per_split % kTokens == 0 && tokens_per_split <= kMaxSplitTokens);
  LORA_CHECK(splits <= 65535 && groups <= std::numeric_limits<int32_t>::max(), "lora_ext: too many tokens (", tokens,
             ") or features (", columns, ")");
  const int64_t columns_padded = groups * kGroupTiles * kCols, tokens_padded = splits * tokens_per_split;
  const auto float_options = grad_y.options().dtype(at::kFloat);
  at::Tensor partials_b = at::empty({splits, columns_padded, kRankPad}, float_options);
  at::Tensor partials_dxa = at::empty({groups, tokens_padded, kRankPad}, float_options);
  const at::Tensor b_rows = lora_B;
  DyPassParams p{};
  p.dy = grad_y.data_ptr();
  p.dy_stride_t = grad_y.stride(0);
  p.b = b_rows.data_ptr();
  p.b_stride_c = b_rows.stride(0);
  p.b_vector_rows = rank_rows_vectorizable(b_rows);
  p.xa = activation.data_ptr<float>();
  p.xa_vector_rows = rank % 8 == 0;
  p.partials_b = partials_b.data_ptr<float>();
  p.partials_dxa = partials_dxa.data_ptr<float>();
  p.tokens = tokens;
  p.columns = columns;
  p.rank = rank;
  p.tokens_per_split = tokens_per_split;
  p.columns_padded = columns_padded;
  p.tokens_padded = tokens_padded;
  p.alpha = static_cast<float>(alpha);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // More than 48 KB of shared memory must be asked for, once per device and instantiation.
  static std::once_flag raised[64];
  const int device = c10::cuda::current_device();
  auto raise_limit = [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(lora_dy_pass_kernel<T, TB>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kSharedBytes)));
  };
  if (device < 64) {
    std::call_once(raised[device], raise_limit);
  } else {
    raise_limit();
  }
  lora_dy_pass_kernel<T, TB>
      <<<dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits)), kThreads, kSharedBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // dB: the splits' partials added in order, written in grad_B's dtype and layout.
  const bool columns_fastest = grad_B.stride(0) == 1 && grad_B.stride(1) != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_B.scalar_type(), "dy_pass_finalize", [&] {
    finalize_token_reduce_kernel<scalar_t>
        <<<static_cast<unsigned>((columns + kFinalizeColumns - 1) / kFinalizeColumns), 256, 0, stream>>>(
            partials_b.data_ptr<float>(), splits, columns, columns_padded, static_cast<int>(rank), kRankPad,
            grad_B.data_ptr<scalar_t>(), grad_B.stride(0), grad_B.stride(1), columns_fastest);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // dxa: the column groups' partials added in order.
  finalize_token_reduce_kernel<float><<<static_cast<unsigned>((tokens + kFinalizeColumns - 1) / kFinalizeColumns), 256, 0,
                                        stream>>>(partials_dxa.data_ptr<float>(), groups, tokens, tokens_padded,
                                                  static_cast<int>(rank), kRankPad, grad_activation.data_ptr<float>(),
                                                  rank, 1, false);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lora_ext
