// silu_and_mul on the GPU: out[t, i] = silu(x[t, i]) * x[t, d + i].
// The first CUDA op; it proves the _C_cuda build and binding path end to end.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_ops.h"

namespace engine_cuda {

__global__ void silu_and_mul_kernel(const float* __restrict__ x,  // [num_tokens, 2 * d]
                                    float* __restrict__ out,      // [num_tokens, d]
                                    int64_t d) {
  const int64_t t = blockIdx.x;
  const float* row = x + t * 2 * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float a = row[i];
    out[t * d + i] = a / (1.0f + __expf(-a)) * row[d + i];
  }
}

static void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("silu_and_mul: ") + what + ": " + cudaGetErrorString(err));
}

void silu_and_mul(const float* x, float* out, int64_t num_tokens, int64_t d, cudaStream_t stream) {
  if (num_tokens == 0 || d == 0) return;
  int threads = d < 1024 ? static_cast<int>((d + 31) / 32 * 32) : 1024;
  silu_and_mul_kernel<<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(x, out, d);
  check_cuda(cudaGetLastError(), "launch");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error: no driver or no device means zero
    return 0;
  }
  return n;
}

void silu_and_mul_host(const float* x, float* out, int64_t num_tokens, int64_t d) {
  float *dx = nullptr, *dout = nullptr;
  size_t in_bytes = num_tokens * 2 * d * sizeof(float), out_bytes = num_tokens * d * sizeof(float);
  check_cuda(cudaMalloc(&dx, in_bytes ? in_bytes : 1), "cudaMalloc");
  cudaError_t err = cudaMalloc(&dout, out_bytes ? out_bytes : 1);
  if (err == cudaSuccess) err = cudaMemcpy(dx, x, in_bytes, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) {
    silu_and_mul(dx, dout, num_tokens, d, nullptr);
    err = cudaMemcpy(out, dout, out_bytes, cudaMemcpyDeviceToHost);
  }
  cudaFree(dx);
  cudaFree(dout);
  check_cuda(err, "copy");
}

}  // namespace engine_cuda
