// rms_norm and fused_add_rms_norm: per-row RMS normalisation, parallel over rows.
// The sum of squares and the scaling run in double, as the reference does, so
// results differ from it only by the final rounding to float32 and summation order.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/convert.h"
#include "engine/isa.h"
#include "engine/ops.h"

namespace engine {
namespace {

// ============================================================================
// Row kernel, compiled once per instruction set
// ============================================================================

// One row: if residual is given, residual += x first and the norm reads it.
//   x, residual, out [hidden]; weight [hidden] already float32.
static inline __attribute__((always_inline)) void norm_row_body(
    const float* x, float* residual, const float* weight, float* out, int64_t hidden,
    double eps) {
  const float* src = x;
  if (residual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) residual[i] += x[i];
    src = residual;
  }
  double sum_sq = 0.0;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < hidden; ++i) sum_sq += static_cast<double>(src[i]) * src[i];
  const double inv_rms = 1.0 / std::sqrt(sum_sq / static_cast<double>(hidden) + eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i)
    out[i] = static_cast<float>(static_cast<double>(src[i]) * inv_rms * weight[i]);
}

using NormRowFn = void (*)(const float*, float*, const float*, float*, int64_t, double);

void norm_row_portable(const float* x, float* r, const float* w, float* o, int64_t n, double e) {
  norm_row_body(x, r, w, o, n, e);
}

#if defined(ENGINE_X86) && defined(__GNUC__)
__attribute__((target("avx2,fma,f16c"))) void norm_row_avx2(const float* x, float* r,
                                                             const float* w, float* o,
                                                             int64_t n, double e) {
  norm_row_body(x, r, w, o, n, e);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void
norm_row_avx512(const float* x, float* r, const float* w, float* o, int64_t n, double e) {
  norm_row_body(x, r, w, o, n, e);
}
#endif

NormRowFn pick_norm_row() {
#if defined(ENGINE_X86) && defined(__GNUC__)
  switch (current_isa()) {
    case Isa::avx512: return norm_row_avx512;
    case Isa::avx2: return norm_row_avx2;
    default: break;
  }
#endif
  return norm_row_portable;
}

// ============================================================================
// Launch helpers
// ============================================================================

// The weight as float32: a view of it when it already is, else a converted copy
// in a per-thread scratch buffer reused across calls (O(hidden), not per token).
const float* weight_as_f32(const TensorView& weight) {
  if (weight.dtype == DType::f32) return weight.ptr<float>();
  thread_local std::vector<float> scratch;
  const int64_t n = weight.size(0);
  scratch.resize(static_cast<size_t>(n));
  const uint16_t* w = weight.ptr<uint16_t>();
  if (weight.dtype == DType::bf16) {
    for (int64_t i = 0; i < n; ++i) scratch[i] = bf16_to_f32(w[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = f16_to_f32(w[i]);
  }
  return scratch.data();
}

void check_weight(const TensorView& weight, const char* op, int64_t hidden) {
  check_dtype(weight, op, "weight", {DType::f32, DType::f16, DType::bf16});
  check_shape(weight, op, "weight", {hidden});
  check_contiguous(weight, op, "weight");
}

void check_rows(const TensorView& t, const char* op, const char* arg) {
  check_dtype(t, op, arg, {DType::f32});
  check_ndim(t, op, arg, 2);
  check_nonempty_row_contiguous(t, op, arg);
}

void check_eps(double eps, const char* op) {
  ENGINE_CHECK(eps >= 0.0 && std::isfinite(eps), op,
               "eps must be a finite number >= 0, got " + std::to_string(eps));
}

// Work below this many elements stays on the calling thread.
constexpr int64_t kParallelMinElements = 1 << 15;

}  // namespace

// ============================================================================
// Launchers
// ============================================================================

void rms_norm(const TensorView& x, const TensorView& weight, double eps, const TensorView& out) {
  const char* op = "rms_norm";
  check_rows(x, op, "x");
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  ENGINE_CHECK(hidden > 0, op, "x must have a non-empty last dimension, got " + x.describe());
  check_weight(weight, op, hidden);
  check_rows(out, op, "out");
  check_shape(out, op, "out", {num_tokens, hidden});
  check_eps(eps, op);

  const float* w = weight_as_f32(weight);
  const NormRowFn row_fn = pick_norm_row();
  const float* xp = x.ptr<float>();
  float* op_out = out.ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
#pragma omp parallel for schedule(static) if (num_tokens * hidden >= kParallelMinElements)
  for (int64_t t = 0; t < num_tokens; ++t)
    row_fn(xp + t * xs, nullptr, w, op_out + t * os, hidden, eps);
}

void fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                        const TensorView& weight, double eps) {
  const char* op = "fused_add_rms_norm";
  check_rows(x, op, "x");
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  ENGINE_CHECK(hidden > 0, op, "x must have a non-empty last dimension, got " + x.describe());
  check_rows(residual, op, "residual");
  check_shape(residual, op, "residual", {num_tokens, hidden});
  check_weight(weight, op, hidden);
  check_eps(eps, op);

  const float* w = weight_as_f32(weight);
  const NormRowFn row_fn = pick_norm_row();
  float* xp = x.ptr<float>();
  float* rp = residual.ptr<float>();
  const int64_t xs = x.stride(0), rs = residual.stride(0);
#pragma omp parallel for schedule(static) if (num_tokens * hidden >= kParallelMinElements)
  for (int64_t t = 0; t < num_tokens; ++t)
    row_fn(xp + t * xs, rp + t * rs, w, xp + t * xs, hidden, eps);
}

}  // namespace engine
