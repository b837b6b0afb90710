// kv_cache_write: scatter the new tokens' K and V rows into the paged cache; and
// rope_kv_cache_write: rope on q and k, then that write, in one pass over the tokens.
//
// The cache is [num_blocks, block_size, num_kv_heads, head_dim], float32, bfloat16 or
// float16 (rounded to nearest even, as numpy's cast and the CUDA op round); a slot is
// block_idx * block_size + offset, so slot s is simply row s of the cache seen
// as [num_blocks * block_size, num_kv_heads * head_dim]. Every slot is checked
// before anything is written, so a rejected call leaves both caches untouched.
#include <cstring>
#include <string>
#include <type_traits>

#include "engine/check.h"
#include "engine/convert.h"
#include "engine/isa.h"
#include "engine/ops.h"
#include "rope_kernels.h"

namespace engine {
namespace kv_cache_detail {
// kv_cache_avx2.cpp: n values, float32 -> float16 / bfloat16 bits.
void to_f16_avx2(const float* src, int64_t n, uint16_t* dst);
void to_bf16_avx2(const float* src, int64_t n, uint16_t* dst);
}  // namespace kv_cache_detail

namespace {

constexpr const char* kOp = "kv_cache_write";

// ---- validation -------------------------------------------------------------------

void check_kv(const TensorView& t, const char* arg, const char* op) {
  check_dtype(t, op, arg, {DType::f32});
  check_ndim(t, op, arg, 3);
}

void check_cache(const TensorView& t, const char* arg, const char* op) {
  check_dtype(t, op, arg, {DType::f32, DType::bf16, DType::f16});
  check_ndim(t, op, arg, 4);
  if (t.numel() > 0) check_contiguous(t, op, arg);  // numpy gives empty arrays 0 strides
}

void validate(const TensorView& k, const TensorView& v, const TensorView& k_cache,
              const TensorView& v_cache, const TensorView& slot_mapping, const char* op = kOp) {
  check_kv(k, "k", op);
  check_kv(v, "v", op);
  check_cache(k_cache, "k_cache", op);
  check_cache(v_cache, "v_cache", op);
  check_dtype(slot_mapping, op, "slot_mapping", {DType::i32});
  check_ndim(slot_mapping, op, "slot_mapping", 1);
  const int64_t num_tokens = k.size(0), num_kv_heads = k.size(1), head_dim = k.size(2);
  check_shape(v, op, "v", {num_tokens, num_kv_heads, head_dim});
  check_shape(k_cache, op, "k_cache", {-1, -1, num_kv_heads, head_dim});
  check_shape(v_cache, op, "v_cache", {k_cache.size(0), k_cache.size(1), num_kv_heads, head_dim});
  check_shape(slot_mapping, op, "slot_mapping", {num_tokens});
  check_same_dtype(v_cache, k_cache, op, "v_cache", "k_cache");
  ENGINE_CHECK(k_cache.data != v_cache.data || k_cache.numel() == 0, op,
               "k_cache and v_cache must be different arrays");
}

// Every slot in [-1, num_slots); the first bad one is reported.
void check_slots(const TensorView& slot_mapping, int64_t num_slots, const char* op = kOp) {
  const int32_t* slots = slot_mapping.ptr<int32_t>();
  const int64_t stride = slot_mapping.stride(0);
  for (int64_t i = 0; i < slot_mapping.size(0); ++i) {
    const int64_t slot = slots[i * stride];
    if (slot < -1 || slot >= num_slots)
      fail(op, "slot_mapping[" + std::to_string(i) + "] = " + std::to_string(slot) +
                    " is outside the cache's " + std::to_string(num_slots) +
                    " slots (expected -1 to skip, or 0.." + std::to_string(num_slots - 1) + ")");
  }
}

// ---- kernel -----------------------------------------------------------------------

inline void store(float* d, float x) { *d = x; }
inline void store(bf16_t* d, float x) { d->bits = f32_to_bf16(x); }
inline void store(f16_t* d, float x) { d->bits = f32_to_f16(x); }

// A contiguous run of n values: a copy, or a conversion (8 at a time where AVX2 and F16C
// are there; the same bits either way).
inline void store_run(float* d, const float* s, int64_t n) {
  std::memcpy(d, s, static_cast<size_t>(n) * sizeof(float));
}
template <typename T>
inline void store_run(T* d, const float* s, int64_t n) {
#if defined(ENGINE_X86)
  if (current_isa() != Isa::portable) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(d);
    if constexpr (std::is_same_v<T, f16_t>) return kv_cache_detail::to_f16_avx2(s, n, bits);
    return kv_cache_detail::to_bf16_avx2(s, n, bits);
  }
#endif
  for (int64_t j = 0; j < n; ++j) store(d + j, s[j]);
}

// dst [num_kv_heads, head_dim] contiguous <- src [num_kv_heads, head_dim] with strides.
template <typename T>
void copy_row(T* dst, const float* src, int64_t num_heads, int64_t head_dim, int64_t head_stride,
              int64_t dim_stride) {
  for (int64_t h = 0; h < num_heads; ++h) {
    const float* s = src + h * head_stride;
    T* d = dst + h * head_dim;
    if (dim_stride == 1) {
      store_run(d, s, head_dim);
    } else {
      for (int64_t j = 0; j < head_dim; ++j) store(d + j, s[j * dim_stride]);
    }
  }
}

// Token i's K and V rows into its slot (none for slot -1).
template <typename T>
inline void write_token(const TensorView& k, const TensorView& v, T* k_dst, T* v_dst,
                        const TensorView& slot_mapping, int64_t i) {
  const int64_t num_heads = k.size(1), head_dim = k.size(2);
  const int64_t row_size = num_heads * head_dim;  // values per slot
  const int64_t slot = slot_mapping.ptr<int32_t>()[i * slot_mapping.stride(0)];
  if (slot < 0) return;
  copy_row(k_dst + slot * row_size, k.ptr<float>() + i * k.stride(0), num_heads, head_dim,
           k.stride(1), k.stride(2));
  copy_row(v_dst + slot * row_size, v.ptr<float>() + i * v.stride(0), num_heads, head_dim,
           v.stride(1), v.stride(2));
}

// Every token's K and V rows into their slots, each after before(i) (rope's rotation, or
// nothing). A few KiB per token: threads would cost more than the copy for decode batches.
template <typename F>
void write_tokens(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                  const TensorView& v_cache, const TensorView& slot_mapping, F&& before) {
  const int64_t num_tokens = k.size(0), row_size = k.size(1) * k.size(2);
  with_float_type(k_cache.dtype, [&](auto type) {
    using T = decltype(type);
    T* k_dst = k_cache.ptr<T>();
    T* v_dst = v_cache.ptr<T>();
#pragma omp parallel for schedule(static) if (num_tokens * row_size >= (1 << 16))
    for (int64_t i = 0; i < num_tokens; ++i) {
      before(i);
      write_token(k, v, k_dst, v_dst, slot_mapping, i);
    }
  });
}

}  // namespace

void kv_cache_write(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                    const TensorView& v_cache, const TensorView& slot_mapping) {
  validate(k, v, k_cache, v_cache, slot_mapping);
  check_slots(slot_mapping, k_cache.size(0) * k_cache.size(1));
  write_tokens(k, v, k_cache, v_cache, slot_mapping, [](int64_t) {});
}

void rope_kv_cache_write(const TensorView& positions, const TensorView& q, const TensorView& k,
                         const TensorView& v, const TensorView& cos_sin_cache, int64_t head_dim,
                         const TensorView& k_cache, const TensorView& v_cache,
                         const TensorView& slot_mapping) {
  const char* op = "rope_kv_cache_write";
  // Everything (every position and slot) is checked before anything is rotated or written.
  validate(k, v, k_cache, v_cache, slot_mapping, op);
  ENGINE_CHECK(k.size(2) == head_dim, op,
               "k must have shape [*, *, head_dim " + std::to_string(head_dim) + "], got " +
                   k.describe());
  const RopeCall r = prepare_rope(positions, q, k, cos_sin_cache, head_dim, op);
  check_slots(slot_mapping, k_cache.size(0) * k_cache.size(1), op);
  write_tokens(k, v, k_cache, v_cache, slot_mapping, [&](int64_t i) { r.token(i); });
}

}  // namespace engine
