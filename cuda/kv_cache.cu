// kv_cache_write and kv_cache_copy on the GPU.
//
// The cache is [num_blocks, block_size, num_kv_heads, head_dim], f32 or bf16, contiguous;
// slot = block_idx * block_size + offset, so slot s is row s of the cache seen as
// [num_blocks * block_size, num_kv_heads * head_dim]. Slots and block ids are device
// values: a kernel skips one that is out of range instead of checking it on the host.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "cuda_ops.h"
#include "engine/check.h"

namespace engine_cuda {

using engine::DType;

namespace {

__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// ================================================================================
// kv_cache_write
// ================================================================================

// One CTA per token; its threads stride over the token's num_kv_heads * head_dim values.
template <typename T>
__global__ void kv_cache_write_kernel(
    const float* __restrict__ k,          // [num_tokens, num_kv_heads, head_dim] strided
    const float* __restrict__ v,          // [num_tokens, num_kv_heads, head_dim] strided
    int64_t k_stride0, int64_t k_stride1, int64_t k_stride2,
    int64_t v_stride0, int64_t v_stride1, int64_t v_stride2,
    T* __restrict__ k_cache,              // [num_slots, num_kv_heads * head_dim]
    T* __restrict__ v_cache,              // [num_slots, num_kv_heads * head_dim]
    const int32_t* __restrict__ slot_mapping,  // [num_tokens] strided
    int64_t slot_stride, int64_t num_slots, int num_kv_heads, int head_dim) {
  pdl_begin();
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token * slot_stride];
  if (slot < 0 || slot >= num_slots) return;  // -1 (padding) or a bad slot: skipped
  const int row_size = num_kv_heads * head_dim;
  T* k_dst = k_cache + slot * row_size;
  T* v_dst = v_cache + slot * row_size;
  const float* k_src = k + token * k_stride0;
  const float* v_src = v + token * v_stride0;
  for (int i = threadIdx.x; i < row_size; i += blockDim.x) {
    const int h = i / head_dim, d = i - h * head_dim;
    store(k_dst + i, k_src[h * k_stride1 + d * k_stride2]);
    store(v_dst + i, v_src[h * v_stride1 + d * v_stride2]);
  }
}

void check_cache(const TensorView& t, const char* op, const char* arg) {
  engine::check_dtype(t, op, arg, {DType::f32, DType::bf16});
  engine::check_ndim(t, op, arg, 4);
  if (t.numel() > 0) engine::check_contiguous(t, op, arg);
}

// ================================================================================
// kv_cache_copy
// ================================================================================

// grid (num_pairs, chunks, 2): z = 0 copies K, z = 1 copies V; a block is block_vecs
// vectors of type V, and the chunks of one pair stride over them.
template <typename V>
__global__ void kv_cache_copy_kernel(V* __restrict__ k_cache,  // [num_blocks, block_vecs]
                                     V* __restrict__ v_cache,  // [num_blocks, block_vecs]
                                     const int32_t* __restrict__ src_blocks,  // [num_pairs]
                                     const int32_t* __restrict__ dst_blocks,  // [num_pairs]
                                     int64_t src_stride, int64_t dst_stride, int64_t num_blocks,
                                     int64_t block_vecs) {
  pdl_begin();
  const int64_t pair = blockIdx.x;
  const int64_t src = src_blocks[pair * src_stride], dst = dst_blocks[pair * dst_stride];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  V* cache = blockIdx.z == 0 ? k_cache : v_cache;
  const V* from = cache + src * block_vecs;
  V* to = cache + dst * block_vecs;
  for (int64_t i = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; i < block_vecs;
       i += (int64_t)gridDim.y * blockDim.x)
    to[i] = from[i];
}

template <typename V>
void launch_copy(const TensorView& k_cache, const TensorView& v_cache, const TensorView& src,
                 const TensorView& dst, int64_t block_bytes, cudaStream_t stream) {
  const int64_t block_vecs = block_bytes / static_cast<int64_t>(sizeof(V));
  const int threads = 256;
  int64_t chunks = (block_vecs + threads - 1) / threads;
  if (chunks > 64) chunks = 64;
  dim3 grid(static_cast<unsigned>(src.size(0)), static_cast<unsigned>(chunks), 2);
  launch_kernel(kv_cache_copy_kernel<V>, grid, threads, 0, stream, static_cast<V*>(k_cache.data),
                static_cast<V*>(v_cache.data), src.ptr<int32_t>(), dst.ptr<int32_t>(),
                src.stride(0), dst.stride(0), k_cache.size(0), block_vecs);
}

}  // namespace

void kv_cache_write(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                    const TensorView& v_cache, const TensorView& slot_mapping,
                    cudaStream_t stream) {
  constexpr const char* op = "kv_cache_write";
  engine::check_dtype(k, op, "k", {DType::f32});
  engine::check_ndim(k, op, "k", 3);
  engine::check_dtype(v, op, "v", {DType::f32});
  engine::check_ndim(v, op, "v", 3);
  check_cache(k_cache, op, "k_cache");
  check_cache(v_cache, op, "v_cache");
  ENGINE_CHECK(v_cache.dtype == k_cache.dtype, op,
               "v_cache must have k_cache's dtype " +
                   std::string(engine::dtype_name(k_cache.dtype)) + ", got " + v_cache.describe());
  engine::check_dtype(slot_mapping, op, "slot_mapping", {DType::i32});
  engine::check_ndim(slot_mapping, op, "slot_mapping", 1);
  const int64_t num_tokens = k.size(0), num_kv_heads = k.size(1), head_dim = k.size(2);
  engine::check_shape(v, op, "v", {num_tokens, num_kv_heads, head_dim});
  engine::check_shape(k_cache, op, "k_cache", {-1, -1, num_kv_heads, head_dim});
  engine::check_shape(v_cache, op, "v_cache",
                      {k_cache.size(0), k_cache.size(1), num_kv_heads, head_dim});
  engine::check_shape(slot_mapping, op, "slot_mapping", {num_tokens});
  ENGINE_CHECK(k_cache.data != v_cache.data || k_cache.numel() == 0, op,
               "k_cache and v_cache must be different arrays");

  const int64_t row_size = num_kv_heads * head_dim;
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  if (num_tokens == 0 || row_size == 0 || num_slots == 0) return;
  const int threads = row_size >= 256 ? 256 : static_cast<int>((row_size + 31) / 32 * 32);
  const unsigned grid = static_cast<unsigned>(num_tokens);
  if (k_cache.dtype == DType::f32) {
    launch_kernel(kv_cache_write_kernel<float>, grid, threads, 0, stream, k.ptr<float>(),
                  v.ptr<float>(), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                  v.stride(2), k_cache.ptr<float>(), v_cache.ptr<float>(),
                  slot_mapping.ptr<int32_t>(), slot_mapping.stride(0), num_slots,
                  static_cast<int>(num_kv_heads), static_cast<int>(head_dim));
  } else {
    launch_kernel(kv_cache_write_kernel<__nv_bfloat16>, grid, threads, 0, stream, k.ptr<float>(),
                  v.ptr<float>(), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                  v.stride(2), k_cache.ptr<__nv_bfloat16>(), v_cache.ptr<__nv_bfloat16>(),
                  slot_mapping.ptr<int32_t>(), slot_mapping.stride(0), num_slots,
                  static_cast<int>(num_kv_heads), static_cast<int>(head_dim));
  }
  check_launch(op);
}

void kv_cache_copy(const TensorView& k_cache, const TensorView& v_cache,
                   const TensorView& src_blocks, const TensorView& dst_blocks,
                   cudaStream_t stream) {
  constexpr const char* op = "kv_cache_copy";
  check_cache(k_cache, op, "k_cache");
  check_cache(v_cache, op, "v_cache");
  engine::check_shape(v_cache, op, "v_cache",
                      {k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)});
  ENGINE_CHECK(v_cache.dtype == k_cache.dtype, op,
               "v_cache must have k_cache's dtype " +
                   std::string(engine::dtype_name(k_cache.dtype)) + ", got " + v_cache.describe());
  ENGINE_CHECK(k_cache.data != v_cache.data || k_cache.numel() == 0, op,
               "k_cache and v_cache must be different arrays");
  engine::check_dtype(src_blocks, op, "src_blocks", {DType::i32});
  engine::check_ndim(src_blocks, op, "src_blocks", 1);
  engine::check_dtype(dst_blocks, op, "dst_blocks", {DType::i32});
  engine::check_shape(dst_blocks, op, "dst_blocks", {src_blocks.size(0)});

  const int64_t num_pairs = src_blocks.size(0);
  const int64_t block_bytes =
      k_cache.size(1) * k_cache.size(2) * k_cache.size(3) * engine::dtype_size(k_cache.dtype);
  if (num_pairs == 0 || block_bytes == 0 || k_cache.size(0) == 0) return;
  const auto aligned = [&](int64_t n) {
    return block_bytes % n == 0 && reinterpret_cast<uintptr_t>(k_cache.data) % n == 0 &&
           reinterpret_cast<uintptr_t>(v_cache.data) % n == 0;
  };
  if (aligned(16))
    launch_copy<int4>(k_cache, v_cache, src_blocks, dst_blocks, block_bytes, stream);
  else if (aligned(4))
    launch_copy<int32_t>(k_cache, v_cache, src_blocks, dst_blocks, block_bytes, stream);
  else
    launch_copy<uint16_t>(k_cache, v_cache, src_blocks, dst_blocks, block_bytes, stream);
  check_launch(op);
}

}  // namespace engine_cuda
