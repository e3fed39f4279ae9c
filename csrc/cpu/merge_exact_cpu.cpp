// lora_ext::merge_exact_ on the CPU: W ± s·B·A in one pass over W, recording (flat index, original bits) of every
// element the matching unmerge (subtract=true, the same arithmetic) would not restore. d = B·A comes from one
// float32 BLAS call per block of 16 rows; each element is then rounded once into W's dtype. Records are
// reserved per 16 × 256 tile (tile_done marks the tiles written), so a record that outgrows its capacity leaves
// the remaining tiles untouched for a second launch (lora_ext/exact_merge.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../checks.h"

namespace lora_ext {
namespace {

constexpr int64_t kRows = 16, kCols = 256;  // must match csrc/cuda/merge_exact.cu

// d = B·A for one block of kRows rows, in float32, by one BLAS call: the same call (same shapes, inputs and
// alignment, one thread) in merge and unmerge, so d is bit-identical in both and the prediction is exact.
template <typename T, typename Bits>
void merge_exact_tiles(at::Tensor& weight, const at::Tensor& lora_A_float, const at::Tensor& lora_B_float,
                       float scaling, bool subtract, at::Tensor& record_index, at::Tensor& record_bits,
                       at::Tensor& state, at::Tensor& tile_done) {
  T* W = weight.data_ptr<T>();
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t tiles_per_row = (in + kCols - 1) / kCols, row_blocks = (out + kRows - 1) / kRows;
  const int64_t capacity = record_index.numel();
  int64_t* index = record_index.data_ptr<int64_t>();
  Bits* bits = static_cast<Bits*>(record_bits.data_ptr());
  int64_t* st = state.data_ptr<int64_t>();
  uint8_t* done = tile_done.data_ptr<uint8_t>();
  std::atomic<int64_t> reserved(st[0]);
  std::atomic<uint64_t> first_failed(static_cast<uint64_t>(st[1]));
  std::atomic<int64_t> non_finite(st[2]);

  // grain 1 < row_blocks whenever there is more than one block: the BLAS call below always runs inside a
  // parallel region, i.e. on one thread, in merge and unmerge alike.
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> merged(kRows * kCols), original(kRows * kCols);
    std::vector<int64_t> miss;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o0 = block * kRows, rows = std::min(kRows, out - o0);
      const at::Tensor d_block = at::mm(lora_B_float.narrow(0, o0, rows), lora_A_float);  // (rows, in) float32
      const float* d = d_block.data_ptr<float>();
      for (int64_t tile = block * tiles_per_row; tile < (block + 1) * tiles_per_row; ++tile) {
        if (!subtract && done[tile]) continue;
        const int64_t k0 = (tile % tiles_per_row) * kCols, cols = std::min(kCols, in - k0);
        miss.clear();
        bool tile_non_finite = false;
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < cols; ++c) {
            const T w = W[(o0 + i) * in + k0 + c];
            const float delta = scaling * d[i * in + k0 + c];
            if (subtract) {
              merged[i * kCols + c] = static_cast<T>(static_cast<float>(w) - delta);
              continue;
            }
            original[i * kCols + c] = w;
            const T m = static_cast<T>(static_cast<float>(w) + delta);
            const T back = static_cast<T>(static_cast<float>(m) - delta);
            merged[i * kCols + c] = m;
            if (std::memcmp(&back, &w, sizeof(T)) != 0) miss.push_back(i * kCols + c);
            if (!std::isfinite(static_cast<float>(m)) && std::isfinite(static_cast<float>(w))) tile_non_finite = true;
          }
        if (tile_non_finite) non_finite.store(1);
        int64_t start = 0;
        if (!miss.empty()) {
          start = reserved.fetch_add(static_cast<int64_t>(miss.size()));
          if (start + static_cast<int64_t>(miss.size()) > capacity) {  // no room: leave this tile untouched
            uint64_t previous = first_failed.load();
            while (static_cast<uint64_t>(start) < previous &&
                   !first_failed.compare_exchange_weak(previous, static_cast<uint64_t>(start))) {
            }
            continue;
          }
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < cols; ++c) W[(o0 + i) * in + k0 + c] = merged[i * kCols + c];
        for (const int64_t e : miss) {
          index[start] = (o0 + e / kCols) * in + k0 + e % kCols;
          std::memcpy(&bits[start], &original[e], sizeof(T));
          ++start;
        }
        if (!subtract) done[tile] = 1;
      }
    }
  });
  st[0] = reserved.load();
  st[1] = static_cast<int64_t>(first_failed.load());
  st[2] = non_finite.load();
}

void merge_exact_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                     bool subtract, at::Tensor& record_index, at::Tensor& record_bits, at::Tensor& state,
                     at::Tensor& tile_done) {
  const char* op = "lora_ext::merge_exact_";
  check_merge_inputs(weight, lora_A, lora_B, op);
  check_scaling(scaling, op);
  LORA_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  LORA_CHECK(weight.scalar_type() != at::kDouble, op, ": float64 weights merge exactly with merge_ already");
  check_same_device(record_index, "record_index", weight, op, "weight");
  check_same_device(record_bits, "record_bits", weight, op, "weight");
  check_same_device(state, "state", weight, op, "weight");
  check_same_device(tile_done, "tile_done", weight, op, "weight");
  const int64_t tiles = ((weight.size(0) + kRows - 1) / kRows) * ((weight.size(1) + kCols - 1) / kCols);
  LORA_CHECK(tile_done.scalar_type() == at::kByte && tile_done.numel() == tiles && tile_done.is_contiguous(), op,
             ": tile_done must be a contiguous uint8 tensor of ", tiles, " elements");
  LORA_CHECK(state.scalar_type() == at::kLong && state.numel() == 3 && state.is_contiguous(), op,
             ": state must be a contiguous int64 tensor of 3 elements");
  LORA_CHECK(record_index.scalar_type() == at::kLong && record_index.is_contiguous(), op,
             ": record_index must be a contiguous int64 tensor");
  LORA_CHECK(record_bits.element_size() == weight.element_size() && record_bits.is_contiguous() &&
                 record_bits.numel() == record_index.numel(),
             op, ": record_bits must be contiguous, as long as record_index, with weight's element size");
  if (weight.numel() == 0) return;
  const at::Tensor A = lora_A.to(at::kFloat).contiguous(), B = lora_B.to(at::kFloat).contiguous();
  const float s = static_cast<float>(scaling);
  switch (weight.scalar_type()) {
    case at::kFloat:
      merge_exact_tiles<float, uint32_t>(weight, A, B, s, subtract, record_index, record_bits, state, tile_done);
      break;
    case at::kHalf:
      merge_exact_tiles<at::Half, uint16_t>(weight, A, B, s, subtract, record_index, record_bits, state, tile_done);
      break;
    case at::kBFloat16:
      merge_exact_tiles<at::BFloat16, uint16_t>(weight, A, B, s, subtract, record_index, record_bits, state,
                                                tile_done);
      break;
    default:
      LORA_CHECK(false, op, ": unsupported dtype ", weight.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("merge_exact_", &merge_exact_cpu); }

}  // namespace lora_ext
