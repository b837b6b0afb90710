// layer_norm: per-row LayerNorm with weight and bias, optionally of x + residual
// (BERT's post-norm "LayerNorm(sublayer(x) + x)" in one pass). Parallel over rows.
// Mean and variance (two passes, no cancellation) and the scaling run in double,
// as the reference does, so results differ from it only by the final rounding.
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

constexpr const char* kOp = "layer_norm";

// ============================================================================
// Row kernel, compiled once per instruction set
// ============================================================================

// One row. With a residual, sum = x + residual (rounded to float, as a framework's
// separate add would) is written to out first and normalised there; out may be x
// or residual itself, since every element is read before its own slot is written.
//   x, residual, out [hidden]; weight, bias [hidden] float32 (bias may be null).
static inline __attribute__((always_inline)) void layer_norm_row_body(
    const float* x, const float* residual, const float* weight, const float* bias, float* out,
    int64_t hidden, double eps) {
  const float* src = x;
  double sum = 0.0;
  if (residual != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < hidden; ++i) {
      const float s = x[i] + residual[i];
      out[i] = s;
      sum += s;
    }
    src = out;
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < hidden; ++i) sum += src[i];
  }
  const double mean = sum / static_cast<double>(hidden);
  double sum_sq = 0.0;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < hidden; ++i) {
    const double d = static_cast<double>(src[i]) - mean;
    sum_sq += d * d;
  }
  const double inv_std = 1.0 / std::sqrt(sum_sq / static_cast<double>(hidden) + eps);
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i)
      out[i] = static_cast<float>((static_cast<double>(src[i]) - mean) * inv_std * weight[i] +
                                  bias[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i)
      out[i] = static_cast<float>((static_cast<double>(src[i]) - mean) * inv_std * weight[i]);
  }
}

using RowFn = void (*)(const float*, const float*, const float*, const float*, float*, int64_t,
                       double);

void row_portable(const float* x, const float* r, const float* w, const float* b, float* o,
                  int64_t n, double e) {
  layer_norm_row_body(x, r, w, b, o, n, e);
}

#if defined(ENGINE_X86) && defined(__GNUC__)
__attribute__((target("avx2,fma,f16c"))) void row_avx2(const float* x, const float* r,
                                                        const float* w, const float* b, float* o,
                                                        int64_t n, double e) {
  layer_norm_row_body(x, r, w, b, o, n, e);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void row_avx512(
    const float* x, const float* r, const float* w, const float* b, float* o, int64_t n,
    double e) {
  layer_norm_row_body(x, r, w, b, o, n, e);
}
#endif

RowFn pick_row() {
#if defined(ENGINE_X86) && defined(__GNUC__)
  switch (current_isa()) {
    case Isa::avx512: return row_avx512;
    case Isa::avx2: return row_avx2;
    default: break;
  }
#endif
  return row_portable;
}

// ============================================================================
// Launch helpers
// ============================================================================

// A [hidden] parameter as float32: the array itself when it already is, else a
// converted copy in the given scratch buffer (O(hidden) per call, not per token).
const float* as_f32(const TensorView& t, std::vector<float>& scratch) {
  if (t.dtype == DType::f32) return t.ptr<float>();
  const int64_t n = t.size(0);
  scratch.resize(static_cast<size_t>(n));
  const uint16_t* p = t.ptr<uint16_t>();
  for (int64_t i = 0; i < n; ++i) scratch[i] = t.dtype == DType::bf16 ? bf16_to_f32(p[i])
                                                                      : f16_to_f32(p[i]);
  return scratch.data();
}

void check_param(const TensorView& t, const char* arg, int64_t hidden) {
  check_dtype(t, kOp, arg, {DType::f32, DType::f16, DType::bf16});
  check_shape(t, kOp, arg, {hidden});
  check_contiguous(t, kOp, arg);
}

void check_rows(const TensorView& t, const char* arg, int64_t num_tokens, int64_t hidden) {
  check_dtype(t, kOp, arg, {DType::f32});
  check_shape(t, kOp, arg, {num_tokens, hidden});
  if (t.numel() > 0) check_row_contiguous(t, kOp, arg);
}

bool same_layout(const TensorView& a, const TensorView& b) {
  return a.data == b.data && a.strides[0] == b.strides[0];
}

// out may be an input itself (same memory, same row stride) but never a shifted view of one.
void check_aliasing(const TensorView& out, const TensorView& in, const char* arg) {
  ENGINE_CHECK(!overlaps(out, in) || same_layout(out, in), kOp,
               std::string("out must be ") + arg + " itself or not overlap it");
}

// Work below this many elements stays on the calling thread.
constexpr int64_t kParallelMinElements = 1 << 15;

}  // namespace

// ============================================================================
// Launcher
// ============================================================================

void layer_norm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                const TensorView& bias, double eps, const TensorView& out) {
  check_dtype(x, kOp, "x", {DType::f32});
  check_ndim(x, kOp, "x", 2);
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  ENGINE_CHECK(hidden > 0, kOp, "x must have a non-empty last dimension, got " + x.describe());
  check_rows(x, "x", num_tokens, hidden);
  if (present(residual)) check_rows(residual, "residual", num_tokens, hidden);
  check_param(weight, "weight", hidden);
  if (present(bias)) check_param(bias, "bias", hidden);
  check_rows(out, "out", num_tokens, hidden);
  ENGINE_CHECK(eps >= 0.0 && std::isfinite(eps), kOp,
               "eps must be a finite number >= 0, got " + std::to_string(eps));
  check_aliasing(out, x, "x");
  if (present(residual)) check_aliasing(out, residual, "residual");
  ENGINE_CHECK(!overlaps(out, weight) && !(present(bias) && overlaps(out, bias)), kOp,
               "out must not overlap weight or bias");

  thread_local std::vector<float> weight_scratch, bias_scratch;
  const float* w = as_f32(weight, weight_scratch);
  const float* b = present(bias) ? as_f32(bias, bias_scratch) : nullptr;
  const RowFn row_fn = pick_row();
  const float* xp = x.ptr<float>();
  const float* rp = present(residual) ? residual.ptr<float>() : nullptr;
  float* op = out.ptr<float>();
  const int64_t xs = x.stride(0), rs = present(residual) ? residual.stride(0) : 0;
  const int64_t os = out.stride(0);
#pragma omp parallel for schedule(static) if (num_tokens * hidden >= kParallelMinElements)
  for (int64_t t = 0; t < num_tokens; ++t)
    row_fn(xp + t * xs, rp ? rp + t * rs : nullptr, w, b, op + t * os, hidden, eps);
}

}  // namespace engine
