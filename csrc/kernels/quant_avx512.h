// Internal to the AVX-512 VNNI quant_matmul kernels (quant_matmul_avx512.cpp for many
// tokens, quant_gemv_avx512.cpp for one): what both compute identically, so that a token's
// result does not depend on which of them ran it. Include after
// `#pragma GCC target("avx512vnni")` and <immintrin.h>.
#pragma once

#include <cstring>

#include "quant_kernels.h"

namespace engine {
namespace quant_detail {
namespace {

constexpr int64_t kKBlock = 1024;  // values per K block (a multiple of 256)

// One 32-value block of x quantised: the portable arithmetic (d = max|x| / 127,
// q = round-half-even(x * (1 / d)); a non-finite block gets d = NaN and codes 0).
struct QuantBlock {
  alignas(16) int8_t q[32];
  float d, s;      // s = d * sum(q)
  int32_t lo, hi;  // sum(q[0..15]), sum(q[16..31])
};

inline void quantize_block(const float* x, QuantBlock& out) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 big = _mm512_set1_ps(3.40282347e+38f);
  const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
  const __m512 a0 = _mm512_and_ps(v0, abs_mask), a1 = _mm512_and_ps(v1, abs_mask);
  const bool finite = (_mm512_cmp_ps_mask(a0, big, _CMP_NLE_UQ) |
                       _mm512_cmp_ps_mask(a1, big, _CMP_NLE_UQ)) == 0;
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  const float db = amax / 127.0f, inv = db != 0.0f ? 1.0f / db : 0.0f;
  const __m512 iv = _mm512_set1_ps(finite ? inv : 0.0f);
  const __mmask16 keep = finite ? 0xFFFF : 0;  // NaN codes of a bad block become 0
  const __m512i q0 = _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(v0, iv));
  const __m512i q1 = _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(v1, iv));
  _mm_store_si128(reinterpret_cast<__m128i*>(out.q), _mm512_cvtsepi32_epi8(q0));
  _mm_store_si128(reinterpret_cast<__m128i*>(out.q + 16), _mm512_cvtsepi32_epi8(q1));
  out.lo = _mm512_reduce_add_epi32(q0);
  out.hi = _mm512_reduce_add_epi32(q1);
  out.d = finite ? db : __builtin_nanf("");
  out.s = out.d * static_cast<float>(out.lo + out.hi);
}

// ---- weights: per-block tables and codes ---------------------------------------------------

inline float half_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return _cvtsh_ss(v);
}

// The scales (and mins, q6_k's integer pair) of blocks [b0, b0 + nb) of a row, written to
// scale[i * stride], min[i * stride], sc6[(2 * i + h) * stride]: one row's table (stride 1)
// or one lane of a row group's (stride = rows).
struct TableView {
  float* scale;
  float* min;
  int32_t* sc6;
  int stride;
};

struct RowTable {
  float scale[kKBlock / 32];
  float min[kKBlock / 32];
  int32_t sc6[kKBlock / 32][2];
  TableView view() { return {scale, min, &sc6[0][0], 1}; }
};

inline void q4_k_scales(const uint8_t* s, int* sc, int* m) {  // ggml's get_scale_min_k4
  for (int j = 0; j < 8; ++j) {
    sc[j] = j < 4 ? s[j] & 63 : (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m[j] = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

template <QuantFormat F>
void row_table(WeightRow w, int64_t b0, int nb, TableView t) {
  const uint8_t* row = w.p;  // k-quant rows are always plain
  const int st = t.stride;
  uint8_t buf[40];
  for (int i = 0; i < nb; ++i) {
    const int64_t b = b0 + i;
    if constexpr (F == QuantFormat::q8_0 || F == QuantFormat::q4_0) {
      t.scale[i * st] = half_at(w.block(b, buf));
    } else if constexpr (F == QuantFormat::q4_1) {
      const uint8_t* blk = w.block(b, buf);
      t.scale[i * st] = half_at(blk);
      t.min[i * st] = half_at(blk + 2);
    } else if constexpr (F == QuantFormat::q4_k) {
      if (i % 8 == 0) {
        const uint8_t* sb = row + (b / 8) * 144;
        int sc[8], m[8];
        q4_k_scales(sb + 4, sc, m);
        const float d = half_at(sb), dmin = half_at(sb + 2);
        for (int j = 0; j < 8; ++j) {
          t.scale[(i + j) * st] = d * static_cast<float>(sc[j]);
          t.min[(i + j) * st] = -dmin * static_cast<float>(m[j]);
        }
      }
    } else {  // q6_k
      const uint8_t* sb = row + (b / 8) * 210;
      const int8_t* sc = reinterpret_cast<const int8_t*>(sb + 192) + 2 * (b % 8);
      t.scale[i * st] = half_at(sb + 208);
      t.sc6[2 * i * st] = sc[0];
      t.sc6[(2 * i + 1) * st] = sc[1];
    }
  }
}

// The 32 unsigned codes of block b, where vpbroadcastd can read them 4 at a time.
template <QuantFormat F>
inline const uint8_t* block_codes(WeightRow w, int64_t b, uint8_t* buf) {
  const uint8_t* row = w.p;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256i v;
  uint8_t tmp[40];
  if constexpr (F == QuantFormat::q8_0) {
    v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.block(b, tmp) + 2)),
                         _mm256_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (F == QuantFormat::q4_0 || F == QuantFormat::q4_1) {
    const uint8_t* qs = w.block(b, tmp) + (F == QuantFormat::q4_0 ? 2 : 4);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    v = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(raw),
                                                 _mm_srli_epi16(raw, 4), 1), low4);
  } else if constexpr (F == QuantFormat::q4_k) {
    const int j = static_cast<int>(b % 8);
    const __m256i raw = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(row + (b / 8) * 144 + 16 + 32 * (j / 2)));
    v = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw, 4) : raw, low4);
  } else {  // q6_k
    const uint8_t* sb = row + (b / 8) * 210;
    const int j = static_cast<int>(b % 8), half = j / 4, part = j % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 64 * half + 32 * (part % 2)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * half));
    const __m256i lo = _mm256_and_si256(part / 2 ? _mm256_srli_epi16(ql, 4) : ql, low4);
    __m256i hi;  // ((qh >> 2 * part) & 3) << 4
    switch (part) {
      case 0: hi = _mm256_slli_epi16(qh, 4); break;
      case 1: hi = _mm256_slli_epi16(qh, 2); break;
      case 2: hi = qh; break;
      default: hi = _mm256_srli_epi16(qh, 2); break;
    }
    v = _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(buf), v);
  // The codes must be read back from memory: without this GCC keeps v in a register and
  // pulls each 4 bytes out with two shuffles before the broadcast, and the shuffle ports,
  // not vpdpbusd, then bound the tile (a broadcast from memory is a load).
  __asm__("" : "+m"(*reinterpret_cast<uint8_t(*)[32]>(buf)));
  return buf;
}

template <QuantFormat F> constexpr int offset_of() {
  return F == QuantFormat::q8_0 ? 128 : F == QuantFormat::q4_0 ? 8 : F == QuantFormat::q6_k ? 32 : 0;
}
template <QuantFormat F> constexpr bool has_min() {
  return F == QuantFormat::q4_1 || F == QuantFormat::q4_k;
}
template <QuantFormat F> constexpr bool k_quant() {
  return F == QuantFormat::q4_k || F == QuantFormat::q6_k;
}
template <QuantFormat F> constexpr int64_t block_bytes() {
  return F == QuantFormat::q8_0 ? 34 : F == QuantFormat::q4_0 ? 18 : F == QuantFormat::q4_1 ? 20
       : F == QuantFormat::q4_k ? 18 : 26;  // per 32 values (k-quants: 144 / 8, 210 / 8 rounded)
}

}  // namespace
}  // namespace quant_detail
}  // namespace engine
