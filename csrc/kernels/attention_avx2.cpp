// paged_attention's vector primitives for AVX2 + FMA; compiled with those flags
// (see CMakeLists.txt) and called only where the CPU has them.
#include <immintrin.h>

#include "attention_kernels.h"
#include "vec_exp.h"

namespace engine {
namespace attention {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 cached values as float32 (bfloat16 widens by a shift, float16 by F16C).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

struct Avx2Ops {
  static constexpr bool kSoftwareWiden = false;
  template <typename T>
  static float dot(const float* a, const T* b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
    float sum = hsum(_mm256_add_ps(s0, s1));
    for (; i < n; ++i) sum += a[i] * to_f32(b[i]);
    return sum;
  }

  // Four keys against one query: q loaded once, the four sums reduced together.
  template <typename T>
  static void dot4(const float* a, const T* b, int64_t b_stride, int64_t n, float* s) {
    if (n % 8 != 0) {
      for (int r = 0; r < 4; ++r) s[r] = dot(a, b + r * b_stride, n);
      return;
    }
    const T *b0 = b, *b1 = b + b_stride, *b2 = b + 2 * b_stride, *b3 = b + 3 * b_stride;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 x = _mm256_loadu_ps(a + i);
      s0 = _mm256_fmadd_ps(x, load8(b0 + i), s0);
      s1 = _mm256_fmadd_ps(x, load8(b1 + i), s1);
      s2 = _mm256_fmadd_ps(x, load8(b2 + i), s2);
      s3 = _mm256_fmadd_ps(x, load8(b3 + i), s3);
    }
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
    _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }

  template <typename T>
  static void widen(const T* x, int64_t x_stride, int64_t n, int64_t dim, float* y) {
    for (int64_t j = 0; j < n; ++j) {
      const T* xj = x + j * x_stride;
      float* yj = y + j * dim;
      int64_t i = 0;
      for (; i + 8 <= dim; i += 8) _mm256_storeu_ps(yj + i, load8(xj + i));
      for (; i < dim; ++i) yj[i] = to_f32(xj[i]);
    }
  }

  static void scale(float* y, float alpha, int64_t n) {
    const __m256 va = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), va));
    for (; i < n; ++i) y[i] *= alpha;
  }

  static float exp_sum(float* s, float m, int64_t n) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
      _mm256_storeu_ps(s + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    if (i < n) {  // through the vector exp too, so that every ISA rounds alike
      float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t j = i; j < n; ++j) tail[j - i] = s[j] - m;
      _mm256_storeu_ps(tail, exp256(_mm256_loadu_ps(tail)));
      for (int64_t j = i; j < n; ++j) {
        s[j] = tail[j - i];
        sum += s[j];
      }
    }
    return sum;
  }

  // Up to 8 accumulators (64 values of y) stay in registers across all n value rows: 8
  // independent FMA chains rather than one (whose latency bounded decode).
  template <typename T>
  static void axpy_rows(float* y, const float* p, const T* x, int64_t x_stride, int64_t n,
                        int64_t dim) {
    int64_t i = 0;
    for (; i + 64 <= dim; i += 64) {
      __m256 acc[8];
      for (int e = 0; e < 8; ++e) acc[e] = _mm256_loadu_ps(y + i + 8 * e);
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const T* xj = x + j * x_stride + i;
        for (int e = 0; e < 8; ++e) acc[e] = _mm256_fmadd_ps(pj, load8(xj + 8 * e), acc[e]);
      }
      for (int e = 0; e < 8; ++e) _mm256_storeu_ps(y + i + 8 * e, acc[e]);
    }
    for (; i + 8 <= dim; i += 8) {
      __m256 acc = _mm256_loadu_ps(y + i);
      for (int64_t j = 0; j < n; ++j)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(x + j * x_stride + i), acc);
      _mm256_storeu_ps(y + i, acc);
    }
    for (; i < dim; ++i) {
      float acc = y[i];
      for (int64_t j = 0; j < n; ++j) acc += p[j] * to_f32(x[j * x_stride + i]);
      y[i] = acc;
    }
  }
};

}  // namespace

void attend_item_avx2(const Args& a, const Item& it, const Dest& d) {
  with_float_type(a.cache_dtype, [&](auto t) { attend_item<Avx2Ops, decltype(t)>(a, it, d); });
}

}  // namespace attention
}  // namespace engine
