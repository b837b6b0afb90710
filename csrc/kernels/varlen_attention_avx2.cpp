// varlen_attention's vector type for AVX2 + FMA; compiled with those flags (see
// CMakeLists.txt) and called only where the CPU has them.
#include <immintrin.h>

#include "varlen_attention_kernels.h"
#include "vec_exp.h"

namespace engine {
namespace varlen {
namespace {

struct Avx2Ops {
  using Vec = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kRows = 6;   // 6 x 2 accumulators + 2 loads + a broadcast of 16 ymm
  static constexpr int kVecs = 2;

  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
  static Vec set1(float x) { return _mm256_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static float reduce_max(Vec x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float reduce_add(Vec x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static Vec exp(Vec x) { return exp256(x); }  // x <= 0; NaN stays NaN
};

}  // namespace

void attend_item_avx2(const Args& a, const Item& it, float* scratch) {
  attend_item<Avx2Ops>(a, it, scratch);
}

}  // namespace varlen
}  // namespace engine
