// rope on the GPU: rotate_half (GPT-NeoX) on the first rotary_dim of each head, in
// place, in double as the CPU does. One block per token; a position outside the
// cos/sin table leaves that token unchanged.
#include "common.cuh"
#include "cuda_ops.h"

namespace engine_cuda {
namespace {

using engine::DType;

struct Heads {
  float* data;
  int64_t num_heads, token_stride, head_stride;
};

//   positions [num_tokens]; cos_sin [max_position, 2 * half]: cos then sin
__global__ void rope_kernel(const int32_t* __restrict__ positions, int64_t pos_stride,
                            Heads q, Heads k, const float* __restrict__ cos_sin,
                            int64_t cs_stride, int64_t max_position, int64_t half) {
  pdl_begin();
  const int64_t t = blockIdx.x;
  const int64_t p = positions[t * pos_stride];
  if (p < 0 || p >= max_position) return;
  const float* cos = cos_sin + p * cs_stride;
  const float* sin = cos + half;
  const int64_t q_work = q.num_heads * half, total = (q.num_heads + k.num_heads) * half;
  for (int64_t w = threadIdx.x; w < total; w += blockDim.x) {
    const Heads& h = w < q_work ? q : k;
    const int64_t j = w < q_work ? w : w - q_work;
    const int64_t head = j / half, i = j % half;
    float* x1 = h.data + t * h.token_stride + head * h.head_stride + i;
    float* x2 = x1 + half;
    const double a = *x1, b = *x2, c = cos[i], s = sin[i];
    *x1 = static_cast<float>(a * c - b * s);
    *x2 = static_cast<float>(b * c + a * s);
  }
}

// The layout engine::check_rope_heads checks, with the data pointer.
Heads heads_of(const TensorView& t, const char* arg, int64_t num_tokens, int64_t head_dim) {
  const engine::RopeHeads h = engine::check_rope_heads(t, arg, num_tokens, head_dim);
  return {t.ptr<float>(), h.num_heads, h.token_stride, h.head_stride};
}

}  // namespace

void rope(const TensorView& positions, const TensorView& q, const TensorView& k,
          const TensorView& cos_sin_cache, int64_t head_dim, cudaStream_t stream) {
  using namespace engine;
  const char* op = "rope";
  check_dtype(positions, op, "positions", {DType::i32});
  check_ndim(positions, op, "positions", 1);
  ENGINE_CHECK(head_dim > 0, op, "head_dim must be > 0, got " + std::to_string(head_dim));
  check_dtype(cos_sin_cache, op, "cos_sin_cache", {DType::f32});
  check_ndim(cos_sin_cache, op, "cos_sin_cache", 2);
  check_nonempty_row_contiguous(cos_sin_cache, op, "cos_sin_cache");
  const int64_t max_position = cos_sin_cache.size(0), rotary_dim = cos_sin_cache.size(1);
  ENGINE_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, op,
               "cos_sin_cache must have an even number of columns (rotary_dim) in [2, head_dim " +
                   std::to_string(head_dim) + "], got " + cos_sin_cache.describe());
  const int64_t num_tokens = positions.size(0);
  const Heads qh = heads_of(q, "q", num_tokens, head_dim);
  const Heads kh = heads_of(k, "k", num_tokens, head_dim);
  if (num_tokens == 0) return;
  const int64_t half = rotary_dim / 2;
  const int threads = row_threads((qh.num_heads + kh.num_heads) * half, 512);
  launch_kernel(rope_kernel, static_cast<unsigned>(num_tokens), threads, 0, stream,
                positions.ptr<int32_t>(), positions.stride(0), qh, kh, cos_sin_cache.ptr<float>(),
                cos_sin_cache.stride(0), max_position, half);
  check_launch(op);
}

}  // namespace engine_cuda
