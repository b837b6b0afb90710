// varlen_attention's vector type for AVX-512 (F, BW, VL, DQ); compiled with those flags
// (see CMakeLists.txt) and called only where the CPU has them.
#include <immintrin.h>

#include "varlen_attention_kernels.h"
#include "vec_exp.h"

namespace engine {
namespace varlen {
namespace {

struct Avx512Ops {
  using Vec = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kRows = 8;   // 8 x 2 accumulators + 2 loads + a broadcast of 32 zmm
  static constexpr int kVecs = 2;

  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
  static Vec set1(float x) { return _mm512_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static float reduce_max(Vec x) { return _mm512_reduce_max_ps(x); }
  static float reduce_add(Vec x) { return _mm512_reduce_add_ps(x); }

  static Vec exp(Vec x) { return exp512(x); }  // x <= 0; NaN stays NaN
};

}  // namespace

void attend_item_avx512(const Args& a, const Item& it, float* scratch) {
  attend_item<Avx512Ops>(a, it, scratch);
}

}  // namespace varlen
}  // namespace engine
