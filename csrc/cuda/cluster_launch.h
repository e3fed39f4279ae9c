// Launch attributes for cudaLaunchKernelEx (sm_90): thread-block clusters, shared by the kernels launched in clusters
// (lora_decode.cuh, lora_gemm_sm90.cu, multi_lora.cu), and programmatic dependent launch (multi_lora.cu).
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

// Lets the kernel start before the kernel ahead of it in the stream has finished (programmatic dependent launch,
// sm_90; captured into CUDA graphs as a programmatic edge): it overlaps the launch with that kernel's end. The
// kernel must call wait_for_preceding_kernel() (async_copy.cuh) before reading anything that kernel writes.
inline cudaLaunchAttribute programmatic_stream_serialization() {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  return attribute;
}

}  // namespace cuda
}  // namespace lora_ext
