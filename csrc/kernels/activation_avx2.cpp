// silu_and_mul's row for AVX2 + FMA: 8 values a step, exp from vec_exp.h (about 2 ulp)
// instead of a libm call per value. Compiled with the AVX2 flags (see CMakeLists.txt) and
// called only where the CPU has them.
#include <immintrin.h>

#include <cstdint>

#include "vec_exp.h"

namespace engine {
namespace activation_detail {

// out[i] = gate[i] / (1 + exp(-gate[i])) * up[i], as silu_and_mul_row_avx512 (exp256
// clamps as exp512 does); the last d % 8 values go through the same vector code, padded.
void silu_and_mul_row_avx2(const float* gate, const float* up, float* out, int64_t d) {
  const __m256 one = _mm256_set1_ps(1.0f);
  auto silu8 = [&](__m256 a, __m256 u) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), a));
    return _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)), u);
  };
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(out + i, silu8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  if (i < d) {
    alignas(32) float g[8] = {0, 0, 0, 0, 0, 0, 0, 0}, u[8] = {0, 0, 0, 0, 0, 0, 0, 0}, o[8];
    for (int64_t j = i; j < d; ++j) {
      g[j - i] = gate[j];
      u[j - i] = up[j];
    }
    _mm256_store_ps(o, silu8(_mm256_load_ps(g), _mm256_load_ps(u)));
    for (int64_t j = i; j < d; ++j) out[j] = o[j - i];
  }
}

}  // namespace activation_detail
}  // namespace engine
