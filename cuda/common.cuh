// Small device helpers shared by the kernel files: loads of f32/f16/bf16 as float,
// block reductions, launch shapes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include "device.h"
#include "engine/check.h"

namespace engine_cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[32];
  __shared__ T total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x / 32;
    T w = lane < num_warps ? partial[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// Threads for a row of n elements: a multiple of 32 in [32, max_threads].
inline int row_threads(int64_t n, int max_threads = 1024) {
  int64_t t = (n + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > max_threads) t = max_threads;
  return static_cast<int>(t);
}

using engine::check_nonempty_row_contiguous;

// ---- programmatic dependent launch (Hopper) ------------------------------------------
// Every kernel is launched through launch_kernel(), which lets it start while the kernel before it
// in the stream is still finishing (on sm_90 and later, unless turned off). So every kernel
// begins with pdl_begin(), before it touches global memory: griddepcontrol.wait returns once
// the grid before has completed and its writes are visible, and launch_dependents then lets
// the next kernel's blocks be scheduled as this one's retire. The overlap hides the gap
// between dependent launches; the order of memory effects is exactly that of plain launches.
// Before sm_90 both instructions are absent and launches are plain.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Weights that no kernel writes may be fetched before pdl_begin(): this pulls the line
// holding p into L2 while the kernel before is finishing.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic_launch() applied. A
// failed launch is left for check_launch (cudaGetLastError) as with <<<>>>.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = programmatic_launch() ? 1 : 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace engine_cuda
