// rms_norm and fused_add_rms_norm on the GPU: one block per row. The sum of squares and
// the scaling run in double, as the CPU and the reference do.
#include "common.cuh"
#include "cuda_ops.h"

namespace engine_cuda {
namespace {

using engine::DType;

// If residual: residual += x, then normalise residual into out (which may be x).
//   x, residual, out [num_rows, hidden] (row strides given); weight [hidden]
template <typename W>
__global__ void rms_norm_kernel(const float* x, int64_t x_stride, float* residual,
                                int64_t r_stride, const W* __restrict__ weight, float* out,
                                int64_t out_stride, int64_t hidden, double eps) {
  pdl_begin();
  const int64_t row = blockIdx.x;
  const float* xr = x + row * x_stride;
  float* rr = residual ? residual + row * r_stride : nullptr;
  float* orow = out + row * out_stride;
  double sum_sq = 0.0;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = xr[i];
    if (rr) {
      v = rr[i] + v;
      rr[i] = v;
    }
    sum_sq += static_cast<double>(v) * v;
  }
  sum_sq = block_sum(sum_sq);
  const double inv_rms = 1.0 / sqrt(sum_sq / static_cast<double>(hidden) + eps);
  const float* src = rr ? rr : xr;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
    orow[i] = static_cast<float>(static_cast<double>(src[i]) * inv_rms * to_float(weight[i]));
}

template <typename W>
void launch(const float* x, int64_t xs, float* r, int64_t rs, const void* w, float* out,
            int64_t os, int64_t rows, int64_t hidden, double eps, cudaStream_t stream) {
  launch_kernel(rms_norm_kernel<W>, static_cast<unsigned>(rows), row_threads(hidden, 512), 0,
                stream, x, xs, r, rs, static_cast<const W*>(w), out, os, hidden, eps);
}

void run(const char* op, const TensorView& x, const TensorView* residual,
         const TensorView& weight, double eps, const TensorView& out, cudaStream_t stream) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  if (rows == 0 || hidden == 0) return;
  float* r = residual ? residual->ptr<float>() : nullptr;
  const int64_t rs = residual ? residual->stride(0) : 0;
  switch (weight.dtype) {
    case DType::f32:
      launch<float>(x.ptr<float>(), x.stride(0), r, rs, weight.data, out.ptr<float>(),
                    out.stride(0), rows, hidden, eps, stream);
      break;
    case DType::f16:
      launch<__half>(x.ptr<float>(), x.stride(0), r, rs, weight.data, out.ptr<float>(),
                     out.stride(0), rows, hidden, eps, stream);
      break;
    default:
      launch<__nv_bfloat16>(x.ptr<float>(), x.stride(0), r, rs, weight.data, out.ptr<float>(),
                            out.stride(0), rows, hidden, eps, stream);
  }
  check_launch(op);
}

void check_common(const char* op, const TensorView& x, const TensorView& weight, double eps) {
  using namespace engine;
  check_dtype(x, op, "x", {DType::f32});
  check_ndim(x, op, "x", 2);
  check_nonempty_row_contiguous(x, op, "x");
  check_dtype(weight, op, "weight", {DType::f32, DType::f16, DType::bf16});
  check_shape(weight, op, "weight", {x.size(1)});
  ENGINE_CHECK(weight.numel() <= 1 || weight.stride(0) == 1, op, "weight must be contiguous");
  ENGINE_CHECK(eps >= 0.0, op, "eps must be >= 0, got " + std::to_string(eps));
}

}  // namespace

void rms_norm(const TensorView& x, const TensorView& weight, double eps, const TensorView& out,
              cudaStream_t stream) {
  const char* op = "rms_norm";
  check_common(op, x, weight, eps);
  engine::check_dtype(out, op, "out", {DType::f32});
  engine::check_shape(out, op, "out", {x.size(0), x.size(1)});
  check_nonempty_row_contiguous(out, op, "out");
  run(op, x, nullptr, weight, eps, out, stream);
}

void fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                        const TensorView& weight, double eps, cudaStream_t stream) {
  const char* op = "fused_add_rms_norm";
  check_common(op, x, weight, eps);
  engine::check_dtype(residual, op, "residual", {DType::f32});
  engine::check_shape(residual, op, "residual", {x.size(0), x.size(1)});
  check_nonempty_row_contiguous(residual, op, "residual");
  run(op, x, &residual, weight, eps, x, stream);
}

}  // namespace engine_cuda
