// silu_and_mul on the GPU: out[t, i] = silu(x[t, i]) * x[t, d + i].
#include "common.cuh"
#include "cuda_ops.h"

namespace engine_cuda {
namespace {

//   x [num_tokens, 2 * d] (row stride x_stride), out [num_tokens, d] (row stride out_stride)
__global__ void silu_and_mul_kernel(const float* __restrict__ x, int64_t x_stride,
                                    float* __restrict__ out, int64_t out_stride, int64_t d) {
  pdl_begin();
  const int64_t t = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  const float* row = x + t * x_stride;
  const float a = row[i];
  out[t * out_stride + i] = a / (1.0f + expf(-a)) * row[d + i];
}

}  // namespace

void silu_and_mul(const TensorView& x, const TensorView& out, cudaStream_t stream) {
  using namespace engine;
  const char* op = "silu_and_mul";
  check_dtype(x, op, "x", {DType::f32});
  check_ndim(x, op, "x", 2);
  ENGINE_CHECK(x.size(1) % 2 == 0, op,
               "x must have an even number of columns, got " + x.describe());
  check_nonempty_row_contiguous(x, op, "x");
  const int64_t n = x.size(0), d = x.size(1) / 2;
  check_dtype(out, op, "out", {DType::f32});
  check_shape(out, op, "out", {n, d});
  check_nonempty_row_contiguous(out, op, "out");
  if (n == 0 || d == 0) return;
  ENGINE_CHECK(n <= 65535, op, "at most 65535 rows per call, got " + std::to_string(n));
  const int threads = 256;
  dim3 grid(static_cast<unsigned>((d + threads - 1) / threads), static_cast<unsigned>(n));
  launch_kernel(silu_and_mul_kernel, grid, threads, 0, stream, x.ptr<float>(), x.stride(0),
                out.ptr<float>(), out.stride(0), d);
  check_launch(op);
}

}  // namespace engine_cuda
