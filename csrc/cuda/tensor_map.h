// Tensor maps for the copy engine (TMA, sm_90): the driver's encoder and the one kind of map our Hopper kernels use,
// a 2-D row-major 16-bit matrix read or written in (box_rows × 64) boxes, 128-byte swizzled. Shared by the fused
// GEMM (lora_gemm_sm90.cu) and the Hopper shrink (lora_shrink_sm90.cu); host code only.
#pragma once

#include <ATen/ATen.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "../error_message.h"

namespace lora_ext {
namespace cuda {

// The driver's tensor-map encoder, or nullptr when the driver has none (the kernels' usable checks then say no).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &function, cudaEnableDefault, &found);
#endif
    if (status != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // the refused query's error, not left for the next kernel launch to report
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  return encode;
}

// Map of a (rows × columns) row-major matrix of 16-bit `dtype` at `data`, rows `row_stride` elements apart (a
// multiple of 8: the copy engine needs 16-byte row pitches), read or written in (box_rows × 64) boxes, 128-byte
// swizzled. Box parts outside the matrix read as zeros and are not written.
inline CUtensorMap swizzled_tile_map(const void* data, at::ScalarType dtype, int64_t rows, int64_t columns,
                                     int64_t row_stride, uint32_t box_rows) {
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(columns), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_stride) * 2};
  const cuuint32_t box[2] = {64, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      dtype == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult result = tensor_map_encoder()(&map, type, 2, const_cast<void*>(data), dims, strides, box,
                                               element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  LORA_CHECK(result == CUDA_SUCCESS, "lora_ext: cuTensorMapEncodeTiled failed (", static_cast<int>(result), ") for a (",
             rows, " × ", columns, ") matrix with row stride ", row_stride);
  return map;
}

// Whether the copy engine can read t's rows (a 2-D tensor): unit column stride, rows 16-byte aligned, apart by a
// multiple of 16 bytes, and not overlapping (the tensor map's row stride is at least a row).
inline bool copy_engine_rows(const at::Tensor& t) {
  return t.dim() == 2 && t.stride(1) == 1 && t.stride(0) % 8 == 0 && t.stride(0) >= t.size(1) &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

}  // namespace cuda
}  // namespace lora_ext
