// lora_ext::merge_exact_ on the CPU: W ± s·B·A in one pass over W, recording (tile-local index, original bits) of
// every element the matching unmerge (subtract=true, the same arithmetic) would not restore. d = B·A comes from
// one float32 BLAS call per block of kMergeTileRows rows; each element is then rounded once into W's dtype. The
// record, `state` and the adapter copy are laid out as ../merge_exact_layout.h says, as on CUDA: a tile whose
// entries do not fit the record's capacity stays untouched for a second launch (lora_ext/exact_merge.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../merge_exact_layout.h"
#include "../no_autocast.h"

namespace lora_ext {
namespace {

// Whether two tensors of the same shape and dtype hold the same bits (NaN == NaN, -0 != +0).
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType bits = a.element_size() == 2 ? at::kShort : at::kInt;
  return at::equal(a.contiguous().view(bits), b.contiguous().view(bits));
}

// d = B·A for one block of kMergeTileRows rows, in float32, by one BLAS call: the same call (same shapes, inputs
// and alignment, one thread) in merge and unmerge, so d is bit-identical in both and the prediction is exact.
template <typename T, typename Bits, typename Entry>
void merge_exact_tiles(at::Tensor& weight, const at::Tensor& lora_A_float, const at::Tensor& lora_B_float,
                       float scaling, bool subtract, at::Tensor& record, at::Tensor& state) {
  T* W = weight.data_ptr<T>();
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t tiles_per_row = (in + kMergeTileCols - 1) / kMergeTileCols;
  const int64_t row_blocks = (out + kMergeTileRows - 1) / kMergeTileRows;
  const int64_t capacity = record.numel();
  Entry* entries = static_cast<Entry*>(record.data_ptr());
  int64_t* st = state.data_ptr<int64_t>();
  int64_t* tile_words = st + kMergeStateHeader;
  constexpr int kWidth = 8 * sizeof(Bits);
  std::atomic<int64_t> reserved(st[0]), written(st[1]), flags(st[2]);

  // grain 1 < row_blocks whenever there is more than one block: the BLAS call below always runs inside a
  // parallel region, i.e. on one thread, in merge and unmerge alike.
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> merged(kMergeTileRows * kMergeTileCols), original(kMergeTileRows * kMergeTileCols);
    std::vector<unsigned char> missed(kMergeTileCols);
    std::vector<int64_t> miss;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o0 = block * kMergeTileRows, rows = std::min(kMergeTileRows, out - o0);
      const at::Tensor d_block = at::mm(lora_B_float.narrow(0, o0, rows), lora_A_float);  // (rows, in) float32
      const float* d = d_block.data_ptr<float>();
      for (int64_t tile = block * tiles_per_row; tile < (block + 1) * tiles_per_row; ++tile) {
        if (!subtract && tile_words[tile] != 0) continue;  // merged by an earlier launch
        const int64_t k0 = (tile % tiles_per_row) * kMergeTileCols, cols = std::min(kMergeTileCols, in - k0);
        miss.clear();
        int64_t tile_flags = 0;
        for (int64_t i = 0; i < rows; ++i) {
          // One row of the tile in branch-free loops the compiler vectorises: the same float32 arithmetic per
          // element as before (W ± s·d rounded once; the merge also rounds the unmerge it predicts), mismatches
          // marked in `missed` and collected afterwards (they are rare: ≈ 0.3% of elements).
          const T* w_row = W + (o0 + i) * in + k0;
          const float* d_row = d + i * in + k0;
          T* merged_row = merged.data() + i * kMergeTileCols;
          if (subtract) {
            for (int64_t c = 0; c < cols; ++c) {
              merged_row[c] = static_cast<T>(static_cast<float>(w_row[c]) - scaling * d_row[c]);
            }
            continue;
          }
          T* original_row = original.data() + i * kMergeTileCols;
          unsigned char* missed_row = missed.data();
          int delta_non_finite = 0, became_non_finite = 0;
          for (int64_t c = 0; c < cols; ++c) {
            const T w = w_row[c];
            const float delta = scaling * d_row[c];
            const T m = static_cast<T>(static_cast<float>(w) + delta);
            const T back = static_cast<T>(static_cast<float>(m) - delta);
            original_row[c] = w;
            merged_row[c] = m;
            Bits back_bits, w_bits;
            std::memcpy(&back_bits, &back, sizeof(T));
            std::memcpy(&w_bits, &w, sizeof(T));
            missed_row[c] = back_bits != w_bits;
            // finite ⇔ |v| ≤ FLT_MAX (false for NaN): comparisons the vectoriser takes, unlike std::isfinite.
            const bool m_finite = std::fabs(static_cast<float>(m)) <= std::numeric_limits<float>::max();
            const bool w_finite = std::fabs(static_cast<float>(w)) <= std::numeric_limits<float>::max();
            delta_non_finite |= !(std::fabs(delta) <= std::numeric_limits<float>::max());
            became_non_finite |= !m_finite & w_finite;
          }
          if (became_non_finite) tile_flags |= kBecameNonFinite;
          if (delta_non_finite) tile_flags |= kDeltaNonFinite;
          for (int64_t c = 0; c < cols; ++c) {
            if (missed_row[c]) miss.push_back(i * kMergeTileCols + c);
          }
        }
        if (tile_flags) flags.fetch_or(tile_flags);
        const int64_t count = static_cast<int64_t>(miss.size());
        int64_t start = 0;
        if (count > 0) {
          start = reserved.fetch_add(count);
          if (start + count > capacity) continue;  // no room: this tile stays untouched for a relaunch
          written.fetch_add(count);
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < cols; ++c) W[(o0 + i) * in + k0 + c] = merged[i * kMergeTileCols + c];
        if (subtract) {  // put back what the plain subtraction misses (nothing in a plain unmerge: word 0)
          const int64_t word = tile_words[tile];
          const int64_t recorded = word == 0 ? 0 : (word & 0xFFFF) - 1;
          for (int64_t e = 0; e < recorded; ++e) {
            const Entry entry = entries[(word >> 16) + e];
            const int64_t local = static_cast<int64_t>(entry >> kWidth);
            const Bits bits = static_cast<Bits>(entry);
            std::memcpy(&W[(o0 + local / kMergeTileCols) * in + k0 + local % kMergeTileCols], &bits, sizeof(T));
          }
          continue;
        }
        for (const int64_t e : miss) {
          Bits bits;
          std::memcpy(&bits, &original[e], sizeof(T));
          entries[start++] = (static_cast<Entry>(e) << kWidth) | static_cast<Entry>(bits);  // e: tile-local
        }
        tile_words[tile] = ((start - count) << 16) | (count + 1);
      }
    }
  });
  st[0] = reserved.load();
  st[1] = written.load();
  st[2] = flags.load();
}

void merge_exact_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                     bool subtract, at::Tensor& record, at::Tensor& state, at::Tensor& adapter_copy) {
  const char* op = "lora_ext::merge_exact_";
  check_merge_exact_inputs(weight, lora_A, lora_B, scaling, record, state, adapter_copy, op);
  if (weight.numel() == 0) return;
  const NoAutocast no_autocast;  // the products in float32 (no_autocast.h)
  at::Tensor A = lora_A, B = lora_B;
  if (adapter_copy.numel() > 0) {
    at::Tensor copy_A = adapter_copy.narrow(0, 0, lora_A.numel()).view(lora_A.sizes());
    at::Tensor copy_B = adapter_copy.narrow(0, lora_A.numel(), lora_B.numel()).view(lora_B.sizes());
    if (!subtract) {
      copy_A.copy_(lora_A);
      copy_B.copy_(lora_B);
    } else {  // unmerge from the adapter as merged; say whether it has changed since
      if (!same_bits(copy_A, lora_A) || !same_bits(copy_B, lora_B))
        state.data_ptr<int64_t>()[2] |= kAdapterChanged;
      A = copy_A;
      B = copy_B;
    }
  }
  // Fresh float32 copies in merge and unmerge alike: the BLAS call then sees the same values with the same
  // (allocator) alignment whether they come from lora_A/lora_B or from adapter_copy.
  const at::Tensor A_float = at::empty(A.sizes(), A.options().dtype(at::kFloat)).copy_(A);
  const at::Tensor B_float = at::empty(B.sizes(), B.options().dtype(at::kFloat)).copy_(B);
  const float s = static_cast<float>(scaling);
  switch (weight.scalar_type()) {
    case at::kFloat:
      merge_exact_tiles<float, uint32_t, uint64_t>(weight, A_float, B_float, s, subtract, record, state);
      break;
    case at::kHalf:
      merge_exact_tiles<at::Half, uint16_t, uint32_t>(weight, A_float, B_float, s, subtract, record, state);
      break;
    case at::kBFloat16:
      merge_exact_tiles<at::BFloat16, uint16_t, uint32_t>(weight, A_float, B_float, s, subtract, record, state);
      break;
    default:
      LORA_CHECK(false, op, ": unsupported dtype ", weight.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("merge_exact_", &merge_exact_cpu); }

}  // namespace lora_ext
