// The backward's two products of dy in one pass over dy, on tensor cores (16-bit dy, r ≤ 16, sm_80+):
//   dxa = s · dy·B      (tokens × r, float32)
//   dB  = s · dyᵀ·xa    (out × r, the adapter's dtype)
//
// Each element of dy feeds both products, summed along different axes (dxa over columns, dB over tokens), so any
// tiling leaves one of them as partial sums. Here a block owns a group of kGroupTiles 128-column tiles and a split
// of the tokens, and walks them as (128-token step, column tile) pairs, copying each 128 × 128 tile of dy into shared
// memory with cp.async one pair ahead. Warp w owns tokens 16w … 16w+15 of every step for dxa and columns 16w … 16w+15
// of every tile for dB, so neither sum is shared between warps inside the block: dxa accumulates in registers over
// the group's tiles and is written once per step as the group's partial; dB accumulates in registers over the
// split's tokens and is written once per block as the split's partial. Both read the same staged tile through
// ldmatrix (plain for dxa's A operand, transposed for dB's B operand), with m16n8k16 MMAs.
// finalize_dy_pass_kernel adds both kinds of partials in a fixed order, in one launch: results repeat bit for bit on
// one GPU model (the token splits follow its SM count, so another model may round differently).
// Bytes: dy once; B once per block and xa once per column group, from L2; partials 64·(splits·C + groups·T) bytes
// (12.6 MB at 8192 × 4096; 19 MB at 8192 × 11008, against the 180 MB read of dy the second pass would cost).
// Two blocks fit an SM of 228 KB of shared memory (Hopper); on an A100 (164 KB) one does, and the grid, sized for two,
// runs in two waves. H100, 8192 tokens: 31 µs at 4096 columns (+ 12 µs of finalize), where session 9's WMMA kernel
// (warps owning columns, dxa summed across them through shared memory every 32 tokens) took 43; 74 µs at 11008
// columns, where the shrink and the token reduction took 139 (docs/perf-notes.md v14).
#pragma once

#include "../error_message.h"
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <array>
#include <atomic>
#include <mutex>

#include "async_copy.cuh"
#include "mma_sync.cuh"
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
  float* partials_dxa;  // (groups × tokens × 16)
  int64_t tokens, columns, rank, tokens_per_split, columns_padded;
  float alpha;
};

namespace dy_pass_detail {
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kStepTokens = 16 * kWarps;  // one 16-token slab per warp (dxa)
constexpr int kTileCols = 16 * kWarps;    // one 16-column slab per warp (dB)
constexpr int kGroupTiles = 4;            // dB accumulators: 8 registers per tile
constexpr int kRankPad = 16;
constexpr int kRankPitch = kRankPad + 8;  // 48-byte rows: the eight rows an ldmatrix reads fall in distinct banks
constexpr int kChunks = kTileCols / 8;    // 16-byte chunks per staged row of dy
constexpr int kStages = 2;
constexpr size_t kDyStageBytes = sizeof(uint16_t) * kStepTokens * kTileCols;                  // 32 KB
constexpr size_t kBBytes = sizeof(uint16_t) * kGroupTiles * kTileCols * kRankPitch;           // 24 KB
constexpr size_t kXaBytes = sizeof(uint16_t) * 2 * kStepTokens * kRankPitch;                  // 12 KB, per step parity
constexpr size_t kSharedBytes = kStages * kDyStageBytes + kBBytes + kXaBytes;                 // 100 KB: 2 blocks per SM
static_assert(kStepTokens * kChunks % kThreads == 0, "each thread copies whole chunks");
static_assert(kStepTokens * (kRankPad / 8) == kThreads, "one 8-rank vector of xa per thread and step");

// The staged dy tile's rows are 256 bytes; chunk c of row r is stored at chunk c ^ (r % 8), so that the eight rows
// one ldmatrix matrix reads (same chunk, consecutive rows) land in eight different bank groups.
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * kTileCols + ((chunk ^ (row & 7)) * 8); }

}  // namespace dy_pass_detail

template <typename T, typename TB>
__global__ void __launch_bounds__(dy_pass_detail::kThreads, 2) lora_dy_pass_kernel(const DyPassParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace dy_pass_detail;
  static_assert(sizeof(T) == sizeof(uint16_t), "16-bit dy");
  wait_for_preceding_kernel();  // launched as a programmatic dependent (dependent_launch.h): nothing read before
  extern __shared__ __align__(128) unsigned char shared_raw[];
  T* dy_stages = reinterpret_cast<T*>(shared_raw);                                   // [kStages][128][128], swizzled
  T* b_tile = reinterpret_cast<T*>(shared_raw + kStages * kDyStageBytes);            // [group columns][kRankPitch]
  T* xa_tiles = reinterpret_cast<T*>(shared_raw + kStages * kDyStageBytes + kBBytes);  // [2][128][kRankPitch]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t group_c0 = static_cast<int64_t>(blockIdx.x) * kGroupTiles * kTileCols;
  const int64_t group_tiles = (p.columns - group_c0 + kTileCols - 1) / kTileCols;
  const int tiles = group_tiles < kGroupTiles ? static_cast<int>(group_tiles) : kGroupTiles;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * p.tokens_per_split;
  const int64_t t_end = min(p.tokens, t_begin + p.tokens_per_split);
  const int steps = static_cast<int>((t_end - t_begin + kStepTokens - 1) / kStepTokens);
  const int iterations = steps * tiles;  // the same for the whole block
  const T* dy = static_cast<const T*>(p.dy);
  const TB* b = static_cast<const TB*>(p.b);

  // dy tile of iteration i (step i / tiles, column tile i % tiles) into stage i % kStages; rows past the split's
  // tokens and columns past C read as zeros.
  auto copy_dy = [&](int i) {
    const int64_t t0 = t_begin + static_cast<int64_t>(i / tiles) * kStepTokens;
    const int64_t c0 = group_c0 + static_cast<int64_t>(i % tiles) * kTileCols;
    T* stage = dy_stages + (i % kStages) * kStepTokens * kTileCols;
#pragma unroll
    for (int q = 0; q < kStepTokens * kChunks / kThreads; ++q) {
      const int v = threadIdx.x + kThreads * q, row = v / kChunks, chunk = v % kChunks;
      const int64_t t = t0 + row, col = c0 + chunk * 8;
      const bool inside = t < t_end && col < p.columns;
      copy_16_bytes_async(stage + swizzled(row, chunk), inside ? dy + t * p.dy_stride_t + col : dy, inside ? 16 : 0);
    }
    copy_async_commit();
  };
  // xa's 128 × 16 block of a step, rounded to dy's type (as the token reduction rounds it); ranks past r zero.
  const int xa_row = threadIdx.x / (kRankPad / 8), xa_rank = (threadIdx.x % (kRankPad / 8)) * 8;
  auto load_xa = [&](int step) {
    const int64_t t = t_begin + static_cast<int64_t>(step) * kStepTokens + xa_row;
    if (t < t_end && xa_rank < p.rank) return load8_ranks_as<T>(p.xa + t * p.rank, xa_rank, p.rank, p.xa_vector_rows);
    return make_uint4(0, 0, 0, 0);
  };

  if (iterations > 0) copy_dy(0);
  // B's rows for the group's columns (columns past C zero), once.
  for (int v = threadIdx.x; v < tiles * kTileCols * (kRankPad / 8); v += kThreads) {
    const int n = v / (kRankPad / 8), j = (v % (kRankPad / 8)) * 8;
    const int64_t col = group_c0 + n;
    uint4 bits = make_uint4(0, 0, 0, 0);
    if (col < p.columns && j < p.rank) bits = load8_ranks_as<T>(b + col * p.b_stride_c, j, p.rank, p.b_vector_rows);
    *reinterpret_cast<uint4*>(b_tile + n * kRankPitch + j) = bits;
  }
  uint4 xa_next = steps > 0 ? load_xa(0) : make_uint4(0, 0, 0, 0);

  float dxa[2][4] = {};                // tokens 16w … (rows) × ranks 0–7 / 8–15
  float grad_b[kGroupTiles][2][4] = {};  // ranks (rows) × columns 16w … of each tile, 0–7 / 8–15
  // ldmatrix row addresses: lanes 0–7, 8–15, 16–23, 24–31 give the rows of the four 8 × 8 matrices.
  const int quad_row = (lane % 8) + 8 * ((lane / 8) % 2), quad_chunk = lane / 16;  // rows 0–15 × chunk 0 / 1
  const int xa_quad_row = (lane % 8) + 8 * (lane / 16), xa_quad_chunk = (lane / 8) % 2;

  for (int i = 0; i < iterations; ++i) {
    const int step = i / tiles, tile = i % tiles;
    if (tile == 0) {
      // This step's xa (read by every tile of the step); its buffer was last read two steps ago.
      *reinterpret_cast<uint4*>(xa_tiles + (step % 2) * kStepTokens * kRankPitch + xa_row * kRankPitch + xa_rank) =
          xa_next;
      if (step + 1 < steps) xa_next = load_xa(step + 1);
    }
    copy_async_wait_all();
    __syncthreads();  // this iteration's dy and xa are staged; every warp is done with the previous stage
    if (i + 1 < iterations) copy_dy(i + 1);

    const T* stage = dy_stages + (i % kStages) * kStepTokens * kTileCols;
    const T* xa_tile = xa_tiles + (step % 2) * kStepTokens * kRankPitch;
    const T* b_rows = b_tile + tile * kTileCols * kRankPitch;
    // dxa for this warp's 16 tokens: dy (16 × 128 columns) · B's rows for the tile's columns.
#pragma unroll
    for (int kc = 0; kc < kTileCols / 16; ++kc) {
      uint32_t a[4], bf[4];
      load_matrices_x4(a, stage + swizzled(16 * warp + quad_row, 2 * kc + quad_chunk));
      load_matrices_x4_transposed(bf, b_rows + (16 * kc + quad_row) * kRankPitch + 8 * quad_chunk);
      mma_16x8x16<T>(dxa[0], a, bf[0], bf[1]);
      mma_16x8x16<T>(dxa[1], a, bf[2], bf[3]);
    }
    // dB for this warp's 16 columns: xaᵀ (16 ranks × 128 tokens) · dy (128 tokens × 16 columns).
#pragma unroll
    for (int kt = 0; kt < kStepTokens / 16; ++kt) {
      uint32_t xa_t[4], dyf[4];
      load_matrices_x4_transposed(xa_t, xa_tile + (16 * kt + xa_quad_row) * kRankPitch + 8 * xa_quad_chunk);
      load_matrices_x4_transposed(dyf, stage + swizzled(16 * kt + quad_row, 2 * warp + quad_chunk));
#pragma unroll
      for (int g = 0; g < kGroupTiles; ++g) {  // registers stay indexed by constants
        if (g == tile) {
          mma_16x8x16<T>(grad_b[g][0], xa_t, dyf[0], dyf[1]);
          mma_16x8x16<T>(grad_b[g][1], xa_t, dyf[2], dyf[3]);
        }
      }
    }

    if (tile == tiles - 1) {
      // The step's dxa over the group's columns: this group's partial for the warp's 16 tokens.
      float* out = p.partials_dxa + static_cast<int64_t>(blockIdx.x) * p.tokens * kRankPad;
      const int64_t t = t_begin + static_cast<int64_t>(step) * kStepTokens + 16 * warp + lane / 4;
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        const int j = 8 * nb + 2 * (lane % 4);
        if (t < t_end) {
          *reinterpret_cast<float2*>(out + t * kRankPad + j) = make_float2(p.alpha * dxa[nb][0], p.alpha * dxa[nb][1]);
        }
        if (t + 8 < t_end) {
          *reinterpret_cast<float2*>(out + (t + 8) * kRankPad + j) =
              make_float2(p.alpha * dxa[nb][2], p.alpha * dxa[nb][3]);
        }
        dxa[nb][0] = dxa[nb][1] = dxa[nb][2] = dxa[nb][3] = 0.f;
      }
    }
  }

  // This split's dB partial for the group's columns (all 16 rank columns; finalize reads the first r).
  float* out = p.partials_b + static_cast<int64_t>(blockIdx.y) * p.columns_padded * kRankPad;
#pragma unroll
  for (int g = 0; g < kGroupTiles; ++g) {
    if (g >= tiles) break;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      const int64_t col = group_c0 + g * kTileCols + 16 * warp + 8 * nb + 2 * (lane % 4);
      const int rank = lane / 4;
      out[col * kRankPad + rank] = p.alpha * grad_b[g][nb][0];
      out[(col + 1) * kRankPad + rank] = p.alpha * grad_b[g][nb][1];
      out[col * kRankPad + rank + 8] = p.alpha * grad_b[g][nb][2];
      out[(col + 1) * kRankPad + rank + 8] = p.alpha * grad_b[g][nb][3];
    }
  }
#else
  __trap();  // dy_pass_supported refuses GPUs before sm_80 and builds without an sm_80+ image of this kernel
#endif
}

// The dy pass's two finalizations in one launch: blocks [0, b_blocks) add dB's token-split partials (columns 16 per
// block), the others dxa's column-group partials (tokens 16 per block). The two are independent, so they run side by
// side instead of one after the other: each alone is a short kernel, mostly launch and tail (≈ 3 µs at 8192 × 4096).
struct FinalizeDyPassParams {
  const float* partials_b;  // (splits × columns_padded × rpad)
  int64_t splits, columns, columns_padded;
  void* grad_b;  // (C × r) in TB, any strides
  int64_t grad_b_stride_c, grad_b_stride_j;
  bool grad_b_columns_fastest;
  int64_t b_blocks;
  const float* partials_dxa;  // (groups × tokens × rpad)
  int64_t groups, tokens;
  float* grad_activation;  // (tokens × r), contiguous
  RoundedCopy rounded;
  int rank, rpad;
};

template <typename TB, typename T>
__global__ void __launch_bounds__(256) finalize_dy_pass_kernel(const FinalizeDyPassParams p) {
  wait_for_preceding_kernel();  // launched as a programmatic dependent (dependent_launch.h): nothing read before
  if (blockIdx.x < p.b_blocks) {
    finalize_token_reduce_block<TB>(p.partials_b, p.splits, p.columns, p.columns_padded, p.rank, p.rpad,
                                    static_cast<TB*>(p.grad_b), p.grad_b_stride_c, p.grad_b_stride_j,
                                    p.grad_b_columns_fastest, RoundedCopy{}, blockIdx.x);
  } else {
    finalize_token_reduce_block<float, T>(p.partials_dxa, p.groups, p.tokens, p.tokens, p.rank, p.rpad,
                                          p.grad_activation, p.rank, 1, false, p.rounded, blockIdx.x - p.b_blocks);
  }
}

// Launches finalize_dy_pass_kernel for grad_B (any floating dtype and strides) and grad_activation (+ `rounded` in T).
template <typename T>
void launch_finalize_dy_pass(FinalizeDyPassParams p, at::Tensor& grad_B) {
  p.grad_b = grad_B.data_ptr();
  p.grad_b_stride_c = grad_B.stride(0);
  p.grad_b_stride_j = grad_B.stride(1);
  p.grad_b_columns_fastest = grad_B.stride(0) == 1 && grad_B.stride(1) != 1;
  p.b_blocks = (p.columns + kFinalizeColumns - 1) / kFinalizeColumns;
  const int64_t blocks = p.b_blocks + (p.tokens + kFinalizeColumns - 1) / kFinalizeColumns;
  LORA_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "lora_ext: too many tokens (", p.tokens,
             ") or features (", p.columns, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_B.scalar_type(), "finalize_dy_pass", [&] {
    launch_dependent(finalize_dy_pass_kernel<scalar_t, T>, dim3(static_cast<unsigned>(blocks)), dim3(256), 0, p);
  });
}

// Whether this build's kernel for the current device was compiled for sm_80+ (its body is __trap() otherwise, e.g.
// in a build for 7.5 with PTX that the driver compiles for a newer GPU); asked once per device.
inline bool dy_pass_kernel_compiled_for_sm80() {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> decided{};  // 0: not yet; 1: yes; -1: no
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && decided[device].load() != 0) return decided[device].load() > 0;
  cudaFuncAttributes attributes{};
  const bool ok = cudaFuncGetAttributes(&attributes, lora_dy_pass_kernel<at::BFloat16, at::BFloat16>) == cudaSuccess &&
                  attributes.ptxVersion >= 80;
  if (!ok) (void)cudaGetLastError();  // a refused query's error is not left for the next launch to report
  if (device < kMaxDevices) decided[device].store(ok ? 1 : -1);
  return ok;
}

// Whether the one-pass kernel can take dy, B and xa (else the shrink and the token reduction run separately). With
// any_width false, only where it was measured to pay: from 1024 columns (on an H100 it beat the two passes at 2048,
// 4096 and 11008 columns, docs/perf-notes.md v14; below 1024 the partials, 64 bytes per split and column, weigh more
// against dy itself, not measured). any_width (LORA_EXT_DY_PASS=force) is for the tests of its edges.
inline bool dy_pass_supported(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& activation,
                              bool any_width = false) {
  const auto* properties = at::cuda::getCurrentDeviceProperties();
  if (properties->major < 8 || !dy_pass_kernel_compiled_for_sm80()) return false;  // mma.sync with bf16 operands
  if (properties->sharedMemPerBlockOptin < dy_pass_detail::kSharedBytes) return false;
  const auto dtype = grad_y.scalar_type();
  if (!(dtype == at::kHalf || dtype == at::kBFloat16)) return false;
  if (lora_B.scalar_type() != dtype && lora_B.scalar_type() != at::kFloat) return false;
  const int64_t rank = lora_B.size(1);
  if (rank < 1 || rank > dy_pass_detail::kRankPad) return false;
  if (activation.scalar_type() != at::kFloat || !activation.is_contiguous() || !aligned16(activation.data_ptr())) {
    return false;
  }
  if (lora_B.stride(1) != 1 && rank != 1) return false;  // B's rows are read along the ranks
  if (!any_width && grad_y.size(1) < 1024) return false;
  if (grad_y.size(0) >= (int64_t{1} << 31)) return false;  // the kernel counts steps in 32 bits
  return grad_y.size(1) % 8 == 0 && grad_y.stride(1) == 1 && (grad_y.size(0) <= 1 || grad_y.stride(0) % 8 == 0) &&
         aligned16(grad_y.data_ptr());
}

// grad_activation (tokens × r, float32, contiguous) = alpha · dy·B and grad_B (C × r, any floating dtype and
// strides) = alpha · dyᵀ·xa, each summed in float32 and rounded once. With `rounded` (in T), grad_activation · its
// scale there too. Returns whether `rounded` was written.
template <typename T, typename TB>
bool launch_dy_pass(at::Tensor& grad_activation, at::Tensor& grad_B, const at::Tensor& grad_y, const at::Tensor& lora_B,
                    const at::Tensor& activation, double alpha, RoundedCopy rounded = {}) {
  using namespace dy_pass_detail;
  const int64_t tokens = grad_y.size(0), columns = grad_y.size(1), rank = lora_B.size(1);
  if (columns == 0) {
    grad_activation.zero_();
    return false;
  }
  if (tokens == 0) {
    grad_B.zero_();
    return false;
  }
  const int64_t group_columns = kGroupTiles * kTileCols;
  const int64_t groups = (columns + group_columns - 1) / group_columns;
  // About two blocks per SM (16 warps): more splits would add dB partials (64·C bytes per split) faster than speed.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t tokens_per_split = (tokens * groups + 2 * sms - 1) / (2 * sms);
  tokens_per_split = std::max<int64_t>(kStepTokens, (tokens_per_split + kStepTokens - 1) / kStepTokens * kStepTokens);
  const int64_t splits = (tokens + tokens_per_split - 1) / tokens_per_split;
  LORA_CHECK(splits <= 65535 && groups <= std::numeric_limits<int32_t>::max() &&
                 tokens_per_split / kStepTokens * kGroupTiles <= std::numeric_limits<int32_t>::max(),
             "lora_ext: too many tokens (", tokens, ") or features (", columns, ")");
  // dB's partial rows cover whole groups (the kernel stores its tiles unguarded); dxa's only the tokens (rows past
  // the last token are neither written nor read), which at very wide C (one split longer than all the tokens) saves
  // most of that buffer.
  const int64_t columns_padded = groups * group_columns;
  const auto float_options = grad_y.options().dtype(at::kFloat);
  at::Tensor partials_b = at::empty({splits, columns_padded, kRankPad}, float_options);
  at::Tensor partials_dxa = at::empty({groups, tokens, kRankPad}, float_options);
  DyPassParams p{};
  p.dy = grad_y.data_ptr();
  p.dy_stride_t = grad_y.stride(0);
  p.b = lora_B.data_ptr();
  p.b_stride_c = lora_B.stride(0);
  p.b_vector_rows = rank_rows_vectorizable(lora_B);
  p.xa = activation.data_ptr<float>();
  p.xa_vector_rows = rank % 8 == 0;
  p.partials_b = partials_b.data_ptr<float>();
  p.partials_dxa = partials_dxa.data_ptr<float>();
  p.tokens = tokens;
  p.columns = columns;
  p.rank = rank;
  p.tokens_per_split = tokens_per_split;
  p.columns_padded = columns_padded;
  p.alpha = static_cast<float>(alpha);
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
  launch_dependent(lora_dy_pass_kernel<T, TB>, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits)),
                   dim3(kThreads), kSharedBytes, p);

  // dB: the splits' partials added in order, written in grad_B's dtype and layout; dxa: the column groups' partials
  // added in order. One launch for both.
  FinalizeDyPassParams f{};
  f.partials_b = partials_b.data_ptr<float>();
  f.splits = splits;
  f.columns = columns;
  f.columns_padded = columns_padded;
  f.partials_dxa = partials_dxa.data_ptr<float>();
  f.groups = groups;
  f.tokens = tokens;
  f.grad_activation = grad_activation.data_ptr<float>();
  f.rounded = rounded;
  f.rank = static_cast<int>(rank);
  f.rpad = kRankPad;
  launch_finalize_dy_pass<T>(f, grad_B);
  return rounded.out != nullptr;
}

}  // namespace cuda
}  // namespace lora_ext
