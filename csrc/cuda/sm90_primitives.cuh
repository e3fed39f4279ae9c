// Hopper (sm_90a) building blocks for lora_gemm_sm90.cu, as thin inline-PTX wrappers: bulk tensor copies (TMA) that
// complete on mbarriers (cluster_barriers.cuh), and warpgroup MMAs (wgmma) reading both operands from shared memory.
// Everything here compiles only into the sm_90a target (__CUDA_ARCH_FEAT_SM90_ALL); other targets see the
// declarations guarded out, and the host never launches the kernel there (lora_gemm_sm90.h).
#pragma once

#include <cuda.h>
#include <cstdint>

#include "cluster_barriers.cuh"

namespace lora_ext {
namespace cuda {
namespace sm90 {

// The mbarrier primitives every sm_90 kernel shares (cluster_barriers.cuh), under this namespace's names too.
using lora_ext::cuda::fence_barrier_init;
using lora_ext::cuda::mbarrier_arrive_expect_bytes;
using lora_ext::cuda::mbarrier_init;
using lora_ext::cuda::mbarrier_wait;
using lora_ext::cuda::shared_address;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// --- bulk tensor copy: a (rows × 64) box of a 2-D tensor into shared memory, 128-byte swizzled ------------------
// Coordinates are (column, row) of the box's first element; parts of the box outside the tensor arrive as zeros.
__device__ __forceinline__ void copy_tile_async(void* destination, const CUtensorMap* map, uint64_t* barrier,
                                                int column, int row) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          shared_address(destination)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(column), "r"(row), "r"(shared_address(barrier))
      : "memory");
}

// The same copy, written into the same shared-memory offset of every block of the cluster named in cta_mask,
// each completing bytes on the barrier at the same offset in its own block.
__device__ __forceinline__ void copy_tile_multicast_async(void* destination, const CUtensorMap* map, uint64_t* barrier,
                                                          int column, int row, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(shared_address(destination)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(column), "r"(row), "r"(shared_address(barrier)), "h"(cta_mask)
      : "memory");
}

// The reverse: a box from shared memory (laid out as the map's swizzle says) into the tensor; parts of the box outside
// the tensor are not written. Completion is tracked per thread by bulk groups (commit / wait below).
__device__ __forceinline__ void store_tile_async(const CUtensorMap* map, const void* source, int column, int row) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(column), "r"(row), "r"(shared_address(source))
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Waits until all but the kPending most recent of this thread's committed store groups have finished reading their
// shared-memory source.
template <int kPending = 0>
__device__ __forceinline__ void bulk_wait_source_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}
// Waits until this thread's committed stores are complete.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Orders this thread's ordinary shared-memory writes before later reads by the copy engine (after a barrier).
__device__ __forceinline__ void fence_shared_for_copy_engine() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Four 8 × 8 matrices of 16-bit values from the registers of a warp into shared memory (stmatrix): register i of
// lane t holds row t / 4, columns 2(t % 4) and 2(t % 4) + 1 of matrix i (an MMA accumulator fragment's layout), and
// lanes 8i … 8i + 7 give the addresses of matrix i's 8 rows (16 bytes each).
__device__ __forceinline__ void store_matrices_x4(void* row_address, uint32_t m0, uint32_t m1, uint32_t m2, uint32_t m3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(shared_address(row_address)),
               "r"(m0), "r"(m1), "r"(m2), "r"(m3)
               : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// --- clusters ------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t cluster_block_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}
__device__ __forceinline__ uint32_t cluster_index() {
  uint32_t index;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(index));
  return index;
}
__device__ __forceinline__ uint32_t cluster_count() {
  uint32_t count;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(count));
  return count;
}
// Blocks in this block's cluster (1 where the kernel was launched without clusters).
__device__ __forceinline__ uint32_t cluster_size() {
  uint32_t size;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
  return size;
}

// Every thread of every block of the cluster: what each wrote to shared memory (and its barriers' initialisation)
// is visible to the others afterwards, and no block leaves while another may still write into its shared memory.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// An arrival on a barrier of this block's own (default release semantics), e.g. a consumer freeing a pipeline stage.
__device__ __forceinline__ void mbarrier_arrive_local(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(barrier)) : "memory");
}

// An arrival on the barrier at this barrier's offset in cluster block `block_rank` (this block's own included).
// Default (CTA-scope) release semantics, as CUTLASS's ClusterBarrier: a cluster-scope release here costs a fence per
// stage that measured 1.6× the whole kernel's time (docs/perf-notes.md v8).
__device__ __forceinline__ void mbarrier_arrive_cluster(uint64_t* barrier, uint32_t block_rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(shared_address(barrier)),
      "r"(block_rank)
      : "memory");
}

// --- register budgets per warpgroup role (the kernel starts under a cap set by __launch_bounds__) ---------------
template <uint32_t kRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <uint32_t kRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}

// --- warpgroup MMA -----------------------------------------------------------------------------------------------
// Shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes (64 16-bit elements), stored as the
// 128-byte-swizzled copy engine writes it: 8-row groups 1024 bytes apart (the stride byte offset), swizzle mode 1.
// The leading byte offset is unused for swizzled K-major layouts (set to 1 by convention). Advancing K by 16
// elements inside the 128-byte row is +32 bytes on the start address; the hardware applies the swizzle.
__device__ __forceinline__ uint64_t swizzled_tile_descriptor(const void* tile) {
  const uint64_t address = shared_address(tile);
  return ((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// Descriptor of an N-major (MN-major) B tile in the same 128-byte swizzle: rows of 64 16-bit elements along N, one
// row per K index, as the copy engine writes a (64 K rows × 64 columns) box of a row-major (K × N) matrix. The
// swizzle atom is 8 K rows × 64 N columns (1024 bytes): the stride byte offset steps 8 K rows (1024 bytes within a
// box), the leading byte offset steps 64 N columns (the next box, `box_bytes` on). Advancing K by 16 is +2 atoms
// (+2048 bytes) on the start address.
__device__ __forceinline__ uint64_t swizzled_n_major_tile_descriptor(const void* tile, uint32_t box_bytes) {
  const uint64_t address = shared_address(tile);
  return ((address & 0x3FFFF) >> 4) | (uint64_t{box_bytes >> 4} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving reads or writes of an accumulator register across the asynchronous MMAs.
__device__ __forceinline__ void fence_accumulator(float& value) { asm volatile("" : "+f"(value)::"memory"); }

// Defines NAME(d, desc_a, desc_b, scale_d): d (64 × 256 float32 in the m64n256 accumulator layout) (+)=
// A (64 × 16) · B (256 × 16)ᵀ in shared memory, addressed by their descriptors: A K-major, B K-major
// (TRANSPOSE_B = 0) or N-major (1); scale_d = 0 overwrites d (a tile's first K step). TYPE is the PTX operand type
// (bf16 or f16). The operand list is long because the instruction names all 128 accumulator registers of the thread.
#define LORA_EXT_DEFINE_WGMMA_M64N256K16(NAME, TYPE, TRANSPOSE_B)                                                     \
  __device__ __forceinline__ void NAME(float(&d)[128], uint64_t desc_a, uint64_t desc_b, int scale_d) {   \
    asm volatile(                                                                                        \
      "{\n"                                                                                               \
      ".reg .pred p;\n"                                                                                   \
      "setp.ne.b32 p, %130, 0;\n"                                                                         \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." #TYPE "." #TYPE " {"                                   \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "   \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "   \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "   \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "   \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "   \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "   \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "   \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"   \
      "}, %128, %129, p, 1, 1, 0, " #TRANSPOSE_B ";\n"                                                                 \
      "}\n"                                                                                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),   \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),   \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),   \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),   \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),   \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),   \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),   \
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),   \
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),   \
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),   \
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),   \
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),   \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),   \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),   \
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])   \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                          \
  }

LORA_EXT_DEFINE_WGMMA_M64N256K16(wgmma_m64n256k16_bf16, bf16, 0)
LORA_EXT_DEFINE_WGMMA_M64N256K16(wgmma_m64n256k16_f16, f16, 0)
LORA_EXT_DEFINE_WGMMA_M64N256K16(wgmma_m64n256k16_bf16_n_major_b, bf16, 1)
LORA_EXT_DEFINE_WGMMA_M64N256K16(wgmma_m64n256k16_f16_n_major_b, f16, 1)
#undef LORA_EXT_DEFINE_WGMMA_M64N256K16

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace sm90
}  // namespace cuda
}  // namespace lora_ext
