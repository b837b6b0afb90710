// silu_and_mul: the gated activation of SwiGLU MLPs, out = silu(gate) * up, where
// x holds [gate | up] side by side (the fused gate+up projection's output).
#include <cmath>
#include <cstdint>

#include "engine/check.h"
#include "engine/isa.h"
#include "engine/ops.h"

namespace engine {
namespace activation_detail {
#if defined(ENGINE_X86)
void silu_and_mul_row_avx512(const float* gate, const float* up, float* out, int64_t d);
void silu_and_mul_row_avx2(const float* gate, const float* up, float* out, int64_t d);
#endif
}  // namespace activation_detail

namespace {

// One row. gate, up, out [d]. silu(a) = a / (1 + exp(-a)); exp overflows to inf
// for a < -88, which gives -0, the float32 rounding of the true value.
static inline __attribute__((always_inline)) void silu_and_mul_row_body(
    const float* gate, const float* up, float* out, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    const float a = gate[i];
    out[i] = a / (1.0f + std::exp(-a)) * up[i];
  }
}

using RowFn = void (*)(const float*, const float*, float*, int64_t);

void row_portable(const float* g, const float* u, float* o, int64_t d) {
  silu_and_mul_row_body(g, u, o, d);
}

RowFn pick_row() {
#if defined(ENGINE_X86) && defined(__GNUC__)
  switch (current_isa()) {
    case Isa::avx512: return activation_detail::silu_and_mul_row_avx512;
    case Isa::avx2: return activation_detail::silu_and_mul_row_avx2;
    default: break;
  }
#endif
  return row_portable;
}

}  // namespace

void silu_and_mul(const TensorView& x, const TensorView& out) {
  const char* op = "silu_and_mul";
  check_dtype(x, op, "x", {DType::f32});
  check_ndim(x, op, "x", 2);
  check_nonempty_row_contiguous(x, op, "x");
  ENGINE_CHECK(x.size(1) % 2 == 0, op,
               "x must have an even number of columns [gate | up], got " + x.describe());
  const int64_t num_tokens = x.size(0), d = x.size(1) / 2;
  check_dtype(out, op, "out", {DType::f32});
  check_shape(out, op, "out", {num_tokens, d});
  check_nonempty_row_contiguous(out, op, "out");

  const RowFn row_fn = pick_row();
  const float* xp = x.ptr<float>();
  float* op_out = out.ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
#pragma omp parallel for schedule(static) if (num_tokens * d >= (1 << 14))
  for (int64_t t = 0; t < num_tokens; ++t) row_fn(xp + t * xs, xp + t * xs + d, op_out + t * os, d);
}

}  // namespace engine
