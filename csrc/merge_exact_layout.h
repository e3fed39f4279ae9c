// What lora_ext::merge_exact_ reads and writes, shared by its CPU and CUDA kernels (and by
// lora_ext/exact_merge.py, which allocates the buffers): the tile that is the unit of the record, the layout of
// `state` and of a record entry, and the input checks.
//
// W is cut into tiles of kMergeTileRows × kMergeTileCols. A merge writes a tile whole or not at all: the tile's
// record entries are reserved in one piece, and if they do not fit the record's capacity the tile stays
// original (the host grows the record and relaunches; only tiles not yet done run again).
//
// state (int64, 3 + tiles, zero-initialised by the caller):
//   [0] record slots reserved, [1] record slots written (the entries [0, state[1]) are valid: reservations are
//   handed out in order, so the ones that fit form a prefix), [2] flags (kBecameNonFinite, kDeltaNonFinite,
//   kAdapterChanged), then per tile: 0 while the tile is not merged, else (start << 16) | (count + 1), its
//   entries being record[start, start + count).
// record entry (int32 for a 16-bit W, int64 for a float32 W): (tile-local index << width) | original bits, the
// tile-local index being row_in_tile · kMergeTileCols + column_in_tile (< 2^13).
// adapter_copy (lora_A's dtype, r·in + out·r elements, or empty): a merge writes lora_A then lora_B there; the
// matching unmerge computes s·B·A from it (the adapter as merged, so the record applies even after an edit
// through .data) and sets kAdapterChanged where lora_A or lora_B no longer equals it.
#pragma once

#include <cmath>
#include <limits>
#include <utility>

#include <ATen/ATen.h>

#include "checks.h"

namespace lora_ext {

constexpr int64_t kMergeTileRows = 32, kMergeTileCols = 256;
constexpr int64_t kMergeStateHeader = 3;
constexpr int64_t kBecameNonFinite = 1;  // a finite element of W would become NaN/Inf
constexpr int64_t kDeltaNonFinite = 2;   // s·B·A is NaN/Inf somewhere (a non-finite adapter always sets it)
constexpr int64_t kAdapterChanged = 4;   // unmerge: lora_A/lora_B differ from adapter_copy

inline int64_t merge_exact_tiles(int64_t out_features, int64_t in_features) {
  return ((out_features + kMergeTileRows - 1) / kMergeTileRows) *
         ((in_features + kMergeTileCols - 1) / kMergeTileCols);
}

inline void check_merge_exact_inputs(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                     double scaling, const at::Tensor& record, const at::Tensor& state,
                                     const at::Tensor& adapter_copy, const char* op) {
  check_merge_inputs(weight, lora_A, lora_B, op);
  check_scaling(scaling, op);
  LORA_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  LORA_CHECK(weight.scalar_type() != at::kDouble, op, ": float64 weights merge exactly with merge_ already");
  const int64_t tiles = merge_exact_tiles(weight.size(0), weight.size(1));
  LORA_CHECK(state.scalar_type() == at::kLong && state.dim() == 1 && state.numel() == kMergeStateHeader + tiles &&
                 state.is_contiguous(),
             op, ": state must be a contiguous int64 tensor of 3 + tiles = ", kMergeStateHeader + tiles,
             " elements (one per ", kMergeTileRows, " x ", kMergeTileCols, " tile of weight), got ",
             shape_string(state), " ", state.scalar_type());
  const at::ScalarType entry = weight.element_size() == 2 ? at::kInt : at::kLong;
  LORA_CHECK(record.scalar_type() == entry && record.dim() == 1 && record.is_contiguous(), op,
             ": record must be a contiguous 1-D ", entry, " tensor for a ", weight.scalar_type(), " weight, got ",
             shape_string(record), " ", record.scalar_type());
  const int64_t adapter_elements = lora_A.numel() + lora_B.numel();
  LORA_CHECK(adapter_copy.numel() == 0 ||
                 (adapter_copy.scalar_type() == lora_A.scalar_type() && adapter_copy.dim() == 1 &&
                  adapter_copy.numel() == adapter_elements && adapter_copy.is_contiguous()),
             op, ": adapter_copy must be empty or a contiguous 1-D ", lora_A.scalar_type(), " tensor of r*in + out*r = ",
             adapter_elements, " elements, got ", shape_string(adapter_copy), " ", adapter_copy.scalar_type());
  check_same_device(record, "record", weight, op, "weight");
  check_same_device(state, "state", weight, op, "weight");
  check_same_device(adapter_copy, "adapter_copy", weight, op, "weight");
  // The kernels compute in float32: a finite double scaling beyond float's range would turn into Inf there and
  // be reported as an adapter that overflows.
  LORA_CHECK(std::abs(scaling) <= static_cast<double>(std::numeric_limits<float>::max()), op, ": scaling = ", scaling,
             " is beyond float32's range (the exact merge computes in float32)");
  // The merge writes adapter_copy, record and state while other blocks read W, A and B: no two may overlap.
  const std::pair<const at::Tensor*, const char*> written[] = {{&adapter_copy, "adapter_copy"}, {&record, "record"},
                                                               {&state, "state"}};
  const std::pair<const at::Tensor*, const char*> all[] = {{&weight, "weight"}, {&lora_A, "lora_A"}, {&lora_B, "lora_B"},
                                                           {&adapter_copy, "adapter_copy"}, {&record, "record"},
                                                           {&state, "state"}};
  for (const auto& [out, out_name] : written) {
    for (const auto& [other, other_name] : all) {
      if (out == other || out->numel() == 0 || other->numel() == 0) continue;
      LORA_CHECK(!may_share_memory(*out, *other), op, ": ", out_name, " and ", other_name, " share memory");
    }
  }
  LORA_CHECK(tiles <= INT32_MAX, op, ": weight has too many ", kMergeTileRows, " x ", kMergeTileCols,
             " tiles for one launch (", tiles, ")");
}

}  // namespace lora_ext
