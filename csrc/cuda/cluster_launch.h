// The launch attribute for thread-block clusters (sm_90), shared by the kernels launched in clusters through
// cudaLaunchKernelEx (lora_decode.cuh, lora_gemm_sm90.cu).
#pragma once

#include <cuda_runtime.h>

namespace lora_ext {
namespace cuda {

// Groups `blocks` consecutive blocks along x into one cluster.
inline cudaLaunchAttribute cluster_along_x(unsigned blocks) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = blocks;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  return attribute;
}

}  // namespace cuda
}  // namespace lora_ext
