// silu_and_mul's row for AVX-512: 16 values a step, exp from vec_exp.h (about 2 ulp)
// instead of a libm call per value. Compiled with the AVX-512 flags (see CMakeLists.txt)
// and called only where the CPU has them.
#include <immintrin.h>

#include <cstdint>

#include "vec_exp.h"

namespace engine {
namespace activation_detail {

// out[i] = gate[i] / (1 + exp(-gate[i])) * up[i]. exp512 clamps its argument to 88, so a
// gate below -88 gives a tiny product where libm's overflow to inf gives -0.
void silu_and_mul_row_avx512(const float* gate, const float* up, float* out, int64_t d) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = d - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (d - i)) - 1u);
    const __m512 a = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), a));
    const __m512 s = _mm512_div_ps(a, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, up + i)));
  }
}

}  // namespace activation_detail
}  // namespace engine
