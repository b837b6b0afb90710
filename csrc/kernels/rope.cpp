// rope: rotary position embedding, in place, rotate_half (GPT-NeoX) layout on the
// first rotary_dim of each head. The rotation runs in double, as the reference's.
#include <cstdint>
#include <string>

#include "engine/check.h"
#include "engine/isa.h"
#include "engine/ops.h"
#include "rope_kernels.h"

namespace engine {
namespace {

// ============================================================================
// Head kernel, compiled once per instruction set
// ============================================================================

// Rotates num_heads heads of one token.
//   head [num_heads, head_stride] (first rotary_dim of each rotated)
//   cos_sin [rotary_dim]: cos in the first half, sin in the second
static inline __attribute__((always_inline)) void rope_heads_body(
    float* head, int64_t num_heads, int64_t head_stride, const float* cos_sin, int64_t half) {
  const float* cos = cos_sin;
  const float* sin = cos_sin + half;
  for (int64_t h = 0; h < num_heads; ++h) {
    float* x1 = head + h * head_stride;
    float* x2 = x1 + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const double a = x1[i], b = x2[i], c = cos[i], s = sin[i];
      x1[i] = static_cast<float>(a * c - b * s);
      x2[i] = static_cast<float>(b * c + a * s);
    }
  }
}

void rope_heads_portable(float* x, int64_t n, int64_t hs, const float* cs, int64_t half) {
  rope_heads_body(x, n, hs, cs, half);
}

#if defined(ENGINE_X86) && defined(__GNUC__)
__attribute__((target("avx2,fma,f16c"))) void rope_heads_avx2(float* x, int64_t n, int64_t hs,
                                                               const float* cs, int64_t half) {
  rope_heads_body(x, n, hs, cs, half);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void
rope_heads_avx512(float* x, int64_t n, int64_t hs, const float* cs, int64_t half) {
  rope_heads_body(x, n, hs, cs, half);
}
#endif

RopeHeadsFn pick_rope_heads() {
#if defined(ENGINE_X86) && defined(__GNUC__)
  switch (current_isa()) {
    case Isa::avx512: return rope_heads_avx512;
    case Isa::avx2: return rope_heads_avx2;
    default: break;
  }
#endif
  return rope_heads_portable;
}

// ============================================================================
// Validation
// ============================================================================

}  // namespace

// ============================================================================
// Launcher
// ============================================================================

RopeCall prepare_rope(const TensorView& positions, const TensorView& q, const TensorView& k,
                      const TensorView& cos_sin_cache, int64_t head_dim, const char* op) {
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
  RopeCall r;
  r.num_tokens = positions.size(0);
  r.q = check_rope_heads(q, "q", r.num_tokens, head_dim, op);
  r.k = check_rope_heads(k, "k", r.num_tokens, head_dim, op);

  // Every position is checked before anything is written.
  r.pos = positions.ptr<int32_t>();
  r.pos_stride = positions.stride(0);
  for (int64_t t = 0; t < r.num_tokens; ++t) {
    const int64_t p = r.pos[t * r.pos_stride];
    ENGINE_CHECK(p >= 0 && p < max_position, op,
                 "positions[" + std::to_string(t) + "] = " + std::to_string(p) +
                     " is outside [0, " + std::to_string(max_position) +
                     ") (the cos_sin_cache rows)");
  }
  r.heads_fn = pick_rope_heads();
  r.cache = cos_sin_cache.ptr<float>();
  r.cache_stride = cos_sin_cache.stride(0);
  r.half = rotary_dim / 2;
  r.q_data = q.ptr<float>();
  r.k_data = k.ptr<float>();
  return r;
}

void rope(const TensorView& positions, const TensorView& q, const TensorView& k,
          const TensorView& cos_sin_cache, int64_t head_dim) {
  const RopeCall r = prepare_rope(positions, q, k, cos_sin_cache, head_dim, "rope");
  const int64_t work = r.num_tokens * (r.q.num_heads + r.k.num_heads) * 2 * r.half;
#pragma omp parallel for schedule(static) if (work >= (1 << 15))
  for (int64_t t = 0; t < r.num_tokens; ++t) r.token(t);
}

}  // namespace engine
