// embedding: gathers table rows (float32, float16 or bfloat16) into float32 rows.
#include <cstdint>
#include <cstring>
#include <string>

#include "engine/check.h"
#include "engine/convert.h"
#include "engine/isa.h"
#include "engine/ops.h"

#if defined(ENGINE_X86) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace engine {
namespace {

// ============================================================================
// Row conversion: src [hidden] of the table's dtype -> dst [hidden] float32
// ============================================================================

void copy_row_f32(const void* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

void copy_row_bf16(const void* src, float* dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {  // vectorises: a widen and a shift
    const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    std::memcpy(dst + i, &bits, 4);
  }
}

void copy_row_f16_portable(const void* src, float* dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
}

#if defined(ENGINE_X86) && defined(__GNUC__)
// F16C converts 8 halves per instruction, exactly (subnormals included).
__attribute__((target("avx2,fma,f16c"))) void copy_row_f16_f16c(const void* src, float* dst,
                                                                 int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
}
#endif

using CopyRowFn = void (*)(const void*, float*, int64_t);

CopyRowFn pick_copy_row(DType dtype) {
  switch (dtype) {
    case DType::f32: return copy_row_f32;
    case DType::bf16: return copy_row_bf16;
    default: break;
  }
#if defined(ENGINE_X86) && defined(__GNUC__)
  if (current_isa() != Isa::portable) return copy_row_f16_f16c;
#endif
  return copy_row_f16_portable;
}

}  // namespace

void embedding(const TensorView& ids, const TensorView& table, const TensorView& out) {
  const char* op = "embedding";
  check_dtype(ids, op, "ids", {DType::i32});
  check_ndim(ids, op, "ids", 1);
  check_dtype(table, op, "table", {DType::f32, DType::f16, DType::bf16});
  check_ndim(table, op, "table", 2);
  check_nonempty_row_contiguous(table, op, "table");
  const int64_t num_tokens = ids.size(0), vocab = table.size(0), hidden = table.size(1);
  check_dtype(out, op, "out", {DType::f32});
  check_shape(out, op, "out", {num_tokens, hidden});
  check_nonempty_row_contiguous(out, op, "out");

  // Every id is checked before anything is written.
  const int32_t* id = ids.ptr<int32_t>();
  const int64_t id_stride = ids.stride(0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t v = id[t * id_stride];
    ENGINE_CHECK(v >= 0 && v < vocab, op,
                 "ids[" + std::to_string(t) + "] = " + std::to_string(v) + " is outside [0, " +
                     std::to_string(vocab) + ") (the table rows)");
  }

  const CopyRowFn copy_row = pick_copy_row(table.dtype);
  const char* tp = static_cast<const char*>(table.data);
  const int64_t row_bytes = table.stride(0) * dtype_size(table.dtype);
  float* op_out = out.ptr<float>();
  const int64_t os = out.stride(0);
#pragma omp parallel for schedule(static) if (num_tokens * hidden >= (1 << 16))
  for (int64_t t = 0; t < num_tokens; ++t)
    copy_row(tp + id[t * id_stride] * row_bytes, op_out + t * os, hidden);
}

}  // namespace engine
