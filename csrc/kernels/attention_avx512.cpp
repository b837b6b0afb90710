// paged_attention's vector primitives for AVX-512 (F, BW, VL, DQ); compiled with
// those flags (see CMakeLists.txt) and called only where the CPU has them.
#include <immintrin.h>

#include "attention_kernels.h"
#include "vec_exp.h"

namespace engine {
namespace attention {
namespace {

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

struct Avx512Ops {
  static float dot(const float* a, const float* b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16)
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
      const __mmask16 m = tail_mask(n - i);
      s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }

  // Four keys against one query: q is loaded once, and the four sums share one
  // reduction tree instead of four horizontal reductions.
  static void dot4(const float* a, const float* b, int64_t b_stride, int64_t n, float* s) {
    const float *b0 = b, *b1 = b + b_stride, *b2 = b + 2 * b_stride, *b3 = b + 3 * b_stride;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
      const __m512 x = _mm512_maskz_loadu_ps(k, a + i);
      s0 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k, b0 + i), s0);
      s1 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k, b1 + i), s1);
      s2 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k, b2 + i), s2);
      s3 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k, b3 + i), s3);
    }
    auto fold = [](__m512 v) {
      return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    };
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(fold(s0), fold(s1)),
                                    _mm256_hadd_ps(fold(s2), fold(s3)));
    _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }

  static void scale(float* y, float alpha, int64_t n) {
    const __m512 va = _mm512_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(y + i), va));
    if (i < n) {
      const __mmask16 m = tail_mask(n - i);
      _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + i), va));
    }
  }

  static float exp_sum(float* s, float m, int64_t n) {
    const __m512 vm = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
      _mm512_storeu_ps(s + i, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (i < n) {
      const __mmask16 k = tail_mask(n - i);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), vm));
      _mm512_mask_storeu_ps(s + i, k, e);
      sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
  }

  // y += sum_j p[j] * x[j]: the whole row of accumulators (NV vectors) stays in registers
  // across the n value rows, two sets of them so that no FMA waits on the one before.
  template <int NV>
  static void axpy_rows_fixed(float* y, const float* p, const float* x, int64_t x_stride,
                              int64_t n) {
    __m512 a0[NV], a1[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      a0[v] = _mm512_loadu_ps(y + 16 * v);
      a1[v] = _mm512_setzero_ps();
    }
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
      const float* x0 = x + j * x_stride;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        a0[v] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(x0 + 16 * v), a0[v]);
        a1[v] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(x0 + x_stride + 16 * v), a1[v]);
      }
    }
    if (j < n) {
      const __m512 p0 = _mm512_set1_ps(p[j]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        a0[v] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(x + j * x_stride + 16 * v), a0[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + 16 * v, _mm512_add_ps(a0[v], a1[v]));
  }

  static void axpy_rows(float* y, const float* p, const float* x, int64_t x_stride, int64_t n,
                        int64_t dim) {
    switch (dim) {  // the common head sizes
      case 64: return axpy_rows_fixed<4>(y, p, x, x_stride, n);
      case 128: return axpy_rows_fixed<8>(y, p, x, x_stride, n);
      default: break;
    }
    for (int64_t i = 0; i < dim; i += 16) {  // any other size: one vector at a time
      const __mmask16 k = dim - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(dim - i);
      __m512 acc = _mm512_maskz_loadu_ps(k, y + i);
      for (int64_t j = 0; j < n; ++j)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(k, x + j * x_stride + i), acc);
      _mm512_mask_storeu_ps(y + i, k, acc);
    }
  }
};

}  // namespace

void attend_item_avx512(const Args& a, const Item& it, const Dest& d) {
  attend_item<Avx512Ops>(a, it, d);
}

}  // namespace attention
}  // namespace engine
