// gelu: the GELU activation of BERT-family MLPs, elementwise over rows.
//   exact (erf) form:  gelu(x) = x / 2 * (1 + erf(x / sqrt(2)))
//   tanh form:         gelu(x) = x / 2 * (1 + tanh(u)),  u = sqrt(2 / pi) * (x + 0.044715 x^3)
//                               = x / (1 + exp(-2u))     (the same function, no cancellation)
// Both are branch-free scalar code that the compiler vectorises for each instruction set
// (std::erf and std::exp would be library calls per element).
#include <cstdint>
#include <cstring>

// Nothing in engine reads floating-point exception flags. Without trapping math GCC may
// compute both sides of a select (a comparison, a division) for every element, which is
// what lets these loops vectorise on AVX2 and SSE2 (AVX-512 masks them either way).
#pragma GCC optimize("no-trapping-math")

#include "engine/check.h"
#include "engine/isa.h"
#include "engine/ops.h"

namespace engine {
namespace {

// ============================================================================
// Element functions
// ============================================================================

// erf(x) as a rational function p(x) / q(x) (Eigen's generic_fast_erf coefficients), in
// double: within 6e-8 of erf for every x. For |x| >= 3.8325, where float32 erf rounds to
// +-1, it is exactly +-1 (so gelu(x) is exactly 0 for x < -5.42). NaN fails the
// comparison and goes through the rational function, staying NaN.
static inline __attribute__((always_inline)) double erf_rational(double x) {
  constexpr double kSaturate = 3.832506856900711;
  const double x2 = x * x;
  double p = 0.00022905065861350646;
  p = p * x2 + 0.0034082910107109506;
  p = p * x2 + 0.050955695062380861;
  p = p * x2 + 0.18520832239976145;
  p = p * x2 + 1.128379143519084;
  double q = -1.1791602954361697e-7;
  q = q * x2 + 0.000023547966471313185;
  q = q * x2 + 0.0010179625278914885;
  q = q * x2 + 0.014070470171167667;
  q = q * x2 + 0.11098505178285362;
  q = q * x2 + 0.49746925110067538;
  q = q * x2 + 1.0;
  double r = x * p / q;
  r = x >= kSaturate ? 1.0 : r;
  return x <= -kSaturate ? -1.0 : r;
}

static inline __attribute__((always_inline)) float gelu_erf(float x) {
  const double xd = x;
  return static_cast<float>(0.5 * xd * (1.0 + erf_rational(xd * 0.7071067811865476)));
}

// exp(y) for float y: Cephes' degree-6 polynomial on y - n ln2, times 2^n built in the
// exponent bits. y is clamped to [-87.3, 88] (the result stays a normal float); NaN stays NaN.
static inline __attribute__((always_inline)) float exp_poly(float y) {
  y = y < -87.3f ? -87.3f : y;
  y = y > 88.0f ? 88.0f : y;
  // Round to nearest by the 1.5 * 2^23 trick: exact for |y * log2(e)| < 2^22. A NaN y
  // takes n = 0 (a float -> int conversion of NaN is undefined); e below stays NaN.
  const float y_num = y == y ? y : 0.0f;
  const float n = (y_num * 1.44269504f + 12582912.0f) - 12582912.0f;
  float r = y - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  // n is in [-126, 127]: 2^n is a normal float built in the exponent bits.
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return e * scale;
}

static inline __attribute__((always_inline)) float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + exp_poly(-2.0f * u));
}

// ============================================================================
// Row kernels, compiled once per instruction set
// ============================================================================

static inline __attribute__((always_inline)) void gelu_row_body(const float* x, float* out,
                                                                 int64_t n, bool tanh_form) {
  if (tanh_form) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = gelu_tanh(x[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = gelu_erf(x[i]);
  }
}

using RowFn = void (*)(const float*, float*, int64_t, bool);

void row_portable(const float* x, float* o, int64_t n, bool t) { gelu_row_body(x, o, n, t); }

#if defined(ENGINE_X86) && defined(__GNUC__)
__attribute__((target("avx2,fma,f16c"))) void row_avx2(const float* x, float* o, int64_t n,
                                                        bool t) {
  gelu_row_body(x, o, n, t);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void row_avx512(
    const float* x, float* o, int64_t n, bool t) {
  gelu_row_body(x, o, n, t);
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

}  // namespace

// ============================================================================
// Launcher
// ============================================================================

void gelu(const TensorView& x, const TensorView& out, bool tanh_approximation) {
  const char* op = "gelu";
  check_dtype(x, op, "x", {DType::f32});
  check_ndim(x, op, "x", 2);
  const int64_t num_tokens = x.size(0), d = x.size(1);
  if (x.numel() > 0) check_row_contiguous(x, op, "x");
  check_dtype(out, op, "out", {DType::f32});
  check_shape(out, op, "out", {num_tokens, d});
  if (out.numel() > 0) check_row_contiguous(out, op, "out");
  // In place is fine (each element is read before it is written); a shifted view is not.
  if (x.numel() > 0 && out.data != x.data) {
    const char* xb = static_cast<const char*>(x.data);
    const char* ob = static_cast<const char*>(out.data);
    const char* xe = xb + ((num_tokens - 1) * x.stride(0) + d) * 4;
    const char* oe = ob + ((num_tokens - 1) * out.stride(0) + d) * 4;
    ENGINE_CHECK(xe <= ob || oe <= xb, op, "out must be x itself or not overlap it");
  } else if (x.numel() > 0) {
    ENGINE_CHECK(x.stride(0) == out.stride(0), op, "out must be x itself or not overlap it");
  }

  const RowFn row_fn = pick_row();
  const float* xp = x.ptr<float>();
  float* op_out = out.ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
#pragma omp parallel for schedule(static) if (num_tokens * d >= (1 << 14))
  for (int64_t t = 0; t < num_tokens; ++t) row_fn(xp + t * xs, op_out + t * os, d,
                                                  tanh_approximation);
}

}  // namespace engine
