// embedding (row gather) and copy on the GPU.
#include "common.cuh"
#include "cuda_ops.h"

namespace engine_cuda {
namespace {

using engine::DType;

// out[t] = table[ids[t]] as float; an id outside [0, vocab) gives zeros.
//   ids [num_tokens]; table [vocab, hidden] (row stride given); out [num_tokens, hidden]
template <typename T>
__global__ void embedding_kernel(const int32_t* __restrict__ ids, int64_t id_stride,
                                 const T* __restrict__ table, int64_t table_stride,
                                 int64_t vocab, float* __restrict__ out, int64_t out_stride,
                                 int64_t hidden) {
  pdl_begin();
  const int64_t t = blockIdx.x;
  const int64_t id = ids[t * id_stride];
  float* o = out + t * out_stride;
  if (id < 0 || id >= vocab) {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = 0.0f;
    return;
  }
  const T* row = table + id * table_stride;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = to_float(row[i]);
}

template <typename T>
void launch(const TensorView& ids, const TensorView& table, const TensorView& out,
            cudaStream_t stream) {
  const int64_t n = ids.size(0), hidden = table.size(1);
  launch_kernel(embedding_kernel<T>, static_cast<unsigned>(n), row_threads(hidden, 256), 0, stream,
                ids.ptr<int32_t>(), ids.stride(0), table.ptr<T>(), table.stride(0), table.size(0),
                out.ptr<float>(), out.stride(0), hidden);
}

}  // namespace

void embedding(const TensorView& ids, const TensorView& table, const TensorView& out,
               cudaStream_t stream) {
  using namespace engine;
  const char* op = "embedding";
  check_dtype(ids, op, "ids", {DType::i32});
  check_ndim(ids, op, "ids", 1);
  check_dtype(table, op, "table", {DType::f32, DType::f16, DType::bf16});
  check_ndim(table, op, "table", 2);
  check_nonempty_row_contiguous(table, op, "table");
  const int64_t n = ids.size(0), hidden = table.size(1);
  check_dtype(out, op, "out", {DType::f32});
  check_shape(out, op, "out", {n, hidden});
  check_nonempty_row_contiguous(out, op, "out");
  if (n == 0 || hidden == 0) return;
  switch (table.dtype) {
    case DType::f32: launch<float>(ids, table, out, stream); break;
    case DType::f16: launch<__half>(ids, table, out, stream); break;
    default: launch<__nv_bfloat16>(ids, table, out, stream);
  }
  check_launch(op);
}

void copy(const TensorView& src, const TensorView& dst, cudaStream_t stream) {
  using namespace engine;
  const char* op = "copy";
  ENGINE_CHECK(src.ndim >= 1 && src.ndim <= 2, op,
               "src must have 1 or 2 dims, got " + src.describe());
  ENGINE_CHECK(dst.dtype == src.dtype && dst.ndim == src.ndim && dst.shape_str() == src.shape_str(),
               op, "dst must be " + src.describe() + " like src, got " + dst.describe());
  check_nonempty_row_contiguous(src, op, "src");
  check_nonempty_row_contiguous(dst, op, "dst");
  if (src.numel() == 0) return;
  const int64_t item = dtype_size(src.dtype);
  const int64_t rows = src.ndim == 2 ? src.size(0) : 1;
  const int64_t row_bytes = src.size(-1) * item;
  const int64_t sp = src.ndim == 2 ? src.stride(0) * item : row_bytes;
  const int64_t dp = dst.ndim == 2 ? dst.stride(0) * item : row_bytes;
  check_cuda(cudaMemcpy2DAsync(dst.data, dp, src.data, sp, row_bytes, rows,
                               cudaMemcpyDeviceToDevice, stream),
             op, "cudaMemcpy2DAsync");
}

}  // namespace engine_cuda
