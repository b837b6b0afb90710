// paged_attention on the GPU: argument checks, the choice of kernel, the split scratch.
//
// Semantics as the CPU op (csrc/kernels/attention.cpp). The launch configuration
// depends only on shapes, never on seq_lens / block_tables / query_start_loc values,
// so a decode step can be captured into a CUDA graph and replayed with new values:
//   - decode shapes (num_tokens == num_seqs), head_dim 64 or 128: split-KV kernel with
//     ceil(max_blocks * block_size / 512) splits and a merge (attention_decode.cu);
//   - anything else: the tiled prefill kernel (attention_prefill.cu); also decode batches
//     when the environment has ENGINE_CUDA_ATTENTION=prefill (read at every call).
// Device values are clamped on the device (see attention.cuh), not checked here.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "attention.cuh"
#include "cuda_ops.h"
#include "engine/check.h"

namespace engine_cuda {

using engine::DType;

namespace {

constexpr const char* kOp = "paged_attention";

void check_args(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                const TensorView& block_tables, const TensorView& seq_lens,
                const TensorView& query_start_loc, double scale, const TensorView& out) {
  engine::check_dtype(q, kOp, "q", {DType::f32});
  engine::check_ndim(q, kOp, "q", 3);
  if (q.numel() > 0) engine::check_row_contiguous(q, kOp, "q");
  const int64_t num_tokens = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  for (const TensorView* c : {&k_cache, &v_cache}) {
    const char* arg = c == &k_cache ? "k_cache" : "v_cache";
    engine::check_dtype(*c, kOp, arg, {DType::f32, DType::bf16});
    engine::check_ndim(*c, kOp, arg, 4);
    if (c->numel() > 0) engine::check_contiguous(*c, kOp, arg);
  }
  ENGINE_CHECK(v_cache.dtype == k_cache.dtype, kOp,
               "v_cache must have k_cache's dtype " +
                   std::string(engine::dtype_name(k_cache.dtype)) + ", got " + v_cache.describe());
  engine::check_shape(k_cache, kOp, "k_cache", {-1, -1, -1, head_dim});
  engine::check_shape(v_cache, kOp, "v_cache",
                      {k_cache.size(0), k_cache.size(1), k_cache.size(2), head_dim});
  const int64_t num_kv_heads = k_cache.size(2);
  ENGINE_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, kOp,
               "q's " + std::to_string(num_q_heads) + " heads must be a multiple of k_cache's " +
                   std::to_string(num_kv_heads) + " KV heads");
  ENGINE_CHECK(k_cache.size(1) > 0, kOp,
               "k_cache must have a block size of at least 1, got " + k_cache.describe());
  ENGINE_CHECK(head_dim <= 256, kOp, "head_dim must be at most 256 on CUDA, got q " + q.describe());
  engine::check_dtype(block_tables, kOp, "block_tables", {DType::i32});
  engine::check_ndim(block_tables, kOp, "block_tables", 2);
  const int64_t num_seqs = block_tables.size(0);
  engine::check_dtype(seq_lens, kOp, "seq_lens", {DType::i32});
  engine::check_shape(seq_lens, kOp, "seq_lens", {num_seqs});
  engine::check_dtype(query_start_loc, kOp, "query_start_loc", {DType::i32});
  engine::check_shape(query_start_loc, kOp, "query_start_loc", {num_seqs + 1});
  engine::check_dtype(out, kOp, "out", {DType::f32});
  engine::check_shape(out, kOp, "out", {num_tokens, num_q_heads, head_dim});
  if (out.numel() > 0) engine::check_row_contiguous(out, kOp, "out");
  ENGINE_CHECK(!overlaps(out, q) && !overlaps(out, k_cache) && !overlaps(out, v_cache), kOp,
               "out must not share memory with q, k_cache or v_cache");
  ENGINE_CHECK(std::isfinite(scale), kOp, "scale must be finite, got " + std::to_string(scale));
  ENGINE_CHECK(num_tokens <= INT32_MAX / 256 && num_seqs < INT32_MAX / 2 && num_q_heads <= 65535 &&
                   block_tables.size(1) * k_cache.size(1) <= INT32_MAX / 2,
               kOp, "sizes must fit 32-bit positions");
}

// ENGINE_CUDA_ATTENTION=prefill sends decode batches to the prefill kernel too: a switch
// for tests and for ruling the split-KV kernel out when a result looks wrong.
bool force_prefill_kernel() {
  const char* v = std::getenv("ENGINE_CUDA_ATTENTION");
  return v != nullptr && std::strcmp(v, "prefill") == 0;
}

// Streaming multiprocessors of the current device (asked once).
int sm_count() {
  static const int count = [] {
    int device = 0, n = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      return 132;  // an H100 SXM
    }
    return n;
  }();
  return count;
}

// The split partials: grow-only, sized outside graph capture (the runner warms up at
// its largest batch first); growing while the stream is capturing is an error. An
// outgrown buffer is never freed: a graph captured earlier still holds its address.
float* split_scratch(int64_t num_floats, cudaStream_t stream) {
  static std::mutex mutex;
  static float* buffer = nullptr;
  static int64_t capacity = 0;  // floats
  std::lock_guard<std::mutex> lock(mutex);
  if (num_floats <= capacity) return buffer;
  if (is_capturing(stream))
    throw std::runtime_error(
        "paged_attention: the split-KV scratch must grow (to " + std::to_string(num_floats) +
        " floats) while the stream is being captured; run the largest batch once before capture");
  const int64_t grown = num_floats > capacity + capacity / 2 ? num_floats : capacity + capacity / 2;
  float* fresh = nullptr;
  check_cuda(cudaMalloc(&fresh, static_cast<size_t>(grown) * sizeof(float)), kOp, "cudaMalloc");
  buffer = fresh;
  capacity = grown;
  return buffer;
}

}  // namespace

void paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                     const TensorView& block_tables, const TensorView& seq_lens,
                     const TensorView& query_start_loc, double scale, const TensorView& out,
                     cudaStream_t stream) {
  check_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out);
  attention::Params p;
  p.q = q.ptr<float>();
  p.q_stride0 = q.stride(0), p.q_stride1 = q.stride(1);
  p.k_cache = k_cache.data, p.v_cache = v_cache.data;
  p.block_tables = block_tables.ptr<int32_t>();
  p.bt_stride0 = block_tables.stride(0), p.bt_stride1 = block_tables.stride(1);
  p.seq_lens = seq_lens.ptr<int32_t>(), p.seq_lens_stride = seq_lens.stride(0);
  p.query_start_loc = query_start_loc.ptr<int32_t>(), p.qsl_stride = query_start_loc.stride(0);
  p.out = out.ptr<float>();
  p.out_stride0 = out.stride(0), p.out_stride1 = out.stride(1);
  p.num_blocks = k_cache.size(0);
  p.num_tokens = static_cast<int>(q.size(0));
  p.num_seqs = static_cast<int>(block_tables.size(0));
  p.num_q_heads = static_cast<int>(q.size(1));
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.group = p.num_q_heads / p.num_kv_heads;
  p.head_dim = static_cast<int>(q.size(2));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.max_blocks = static_cast<int>(block_tables.size(1));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // log2(e)
  p.partition_size = 512;
  if (p.num_tokens == 0 || p.num_q_heads == 0 || p.head_dim == 0 || p.num_seqs == 0) return;
  const bool is_bf16 = k_cache.dtype == DType::bf16;
  const bool aligned = reinterpret_cast<uintptr_t>(k_cache.data) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(v_cache.data) % 16 == 0;
  const int64_t max_len = static_cast<int64_t>(p.max_blocks) * p.block_size;
  const bool decode_shapes = p.num_tokens == p.num_seqs && max_len > 0 &&
                             max_len <= 512LL * 65535;  // splits fit grid.z
  if (decode_shapes && aligned && (p.head_dim == 64 || p.head_dim == 128) &&
      !force_prefill_kernel()) {
    // Splits of 512 positions; shorter ones (down to 64) when the grid would not give
    // every SM two CTAs (few sequences and heads: the latency-bound single-stream case).
    const int chunk_heads = attention::decode_chunk_heads(p.group);
    const int64_t num_chunks = (p.group + chunk_heads - 1) / chunk_heads;
    const int64_t ctas_per_split = static_cast<int64_t>(p.num_seqs) * p.num_kv_heads * num_chunks;
    p.partition_size = 512;
    while (p.partition_size > 64 &&
           ctas_per_split * ((max_len + p.partition_size - 1) / p.partition_size) <
               2 * sm_count())
      p.partition_size /= 2;
    const int num_splits = static_cast<int>((max_len + p.partition_size - 1) / p.partition_size);
    float* scratch = nullptr;
    if (num_splits > 1)
      scratch = split_scratch(static_cast<int64_t>(p.num_tokens) * p.num_q_heads * num_splits *
                                  (p.head_dim + 2),
                              stream);
    attention::launch_decode(p, is_bf16, num_splits, scratch, stream);
  } else {
    attention::launch_prefill(p, is_bf16, stream);
  }
  check_launch(kOp);
}

}  // namespace engine_cuda
