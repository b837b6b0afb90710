// quant_matmul kernels for AVX2 (also what AVX-512 CPUs without VNNI run).
//
// A step is 32 weight values: one 32-value block, or an eighth of a 256-value
// super-block. vpmaddubsw multiplies unsigned by signed bytes into saturating 16-bit pair
// sums, so q8_0 and q6_k use llama.cpp's sign trick: |w| times x with w's sign (|w| <= 128,
// |x| <= 127: a pair sum never saturates). q4_1 and q4_k codes are already unsigned (0..15)
// and their min adds min * d_x * sum(q_x) / 8 per lane; q4_0's codes (0..15 for -8..7) are
// taken as they are, less 8 * sum(q_x) per lane (two operations a token, not two a row).
// vpmaddwd then sums pairs into 8 i32 lanes of 4 values each.
#include <immintrin.h>

#include <cstring>

#include "quant_kernels.h"

namespace engine {
namespace quant_detail {
namespace {

// ---- helpers -----------------------------------------------------------------------

inline float load_half(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return _cvtsh_ss(v);
}

inline __m256i load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// 16 nibble bytes -> 32 codes in value order: [v & 15, v >> 4]. The 16 bytes in both halves,
// the upper half's 64-bit words shifted by 4 (a byte's high nibble down to its low one).
inline __m256i nibbles(const uint8_t* p) {
  const __m256i both =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4)),
                          _mm256_set1_epi8(0x0F));
}

// An f16 at any alignment in all 8 lanes (one broadcast and one conversion).
inline __m256 broadcast_half(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(v)));
}

// 8 bytes -> 8 floats.
inline __m256 bytes_to_float(const uint8_t* p, bool is_signed) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
}

// ---- formats: one step of 32 values --------------------------------------------------

struct Step {
  __m256i q;     // signed values (kSigned) or unsigned codes (q4_0's: value + 8)
  __m256 scale;  // per lane
  __m256 min;    // per lane, already / 8 (formats with a min)
};

template <QuantFormat F> struct Fmt;

// kOffset8: unsigned codes 0..15 standing for code - 8 (q4_0): the dot takes the codes as
// they are, less 8 * the sum of x's codes, per 4-value lane (exact integers either way).
template <> struct Fmt<QuantFormat::q8_0> {
  static constexpr bool kSigned = true, kHasMin = false, kOffset8 = false;
  static constexpr int kGroupSteps = 1;
  struct Group {};
  static void group(WeightRow, int64_t, Group&) {}
  static void step(WeightRow row, int64_t s, const Group&, Step& w) {
    uint8_t buf[40];
    const uint8_t* a = row.block(s, buf);
    w.q = load256(a + 2);
    w.scale = broadcast_half(a);
  }
};

template <> struct Fmt<QuantFormat::q4_0> {
  static constexpr bool kSigned = false, kHasMin = false, kOffset8 = true;
  static constexpr int kGroupSteps = 1;
  struct Group {};
  static void group(WeightRow, int64_t, Group&) {}
  static void step(WeightRow row, int64_t s, const Group&, Step& w) {
    uint8_t buf[40];
    const uint8_t* a = row.block(s, buf);
    w.q = nibbles(a + 2);
    w.scale = broadcast_half(a);
  }
};

template <> struct Fmt<QuantFormat::q4_1> {
  static constexpr bool kSigned = false, kHasMin = true, kOffset8 = false;
  static constexpr int kGroupSteps = 1;
  struct Group {};
  static void group(WeightRow, int64_t, Group&) {}
  static void step(WeightRow row, int64_t s, const Group&, Step& w) {
    uint8_t buf[40];
    const uint8_t* a = row.block(s, buf);
    w.q = nibbles(a + 4);
    w.scale = broadcast_half(a);
    w.min = _mm256_set1_ps(load_half(a + 2) * 0.125f);
  }
};

template <> struct Fmt<QuantFormat::q4_k> {
  static constexpr bool kSigned = false, kHasMin = true, kOffset8 = false;
  static constexpr int kGroupSteps = 8;
  struct Group {
    const uint8_t* qs;
    __m256 scales;  // d * sc_0..7
    __m256 mins;    // -dmin * m_0..7 / 8
  };
  static void group(WeightRow row, int64_t g, Group& out) {  // k-quant rows: always plain
    const uint8_t* b = row.p + g * 144;
    uint32_t u[4];  // ggml's unpacking: 8 scale bytes, then 8 min bytes
    std::memcpy(u, b + 4, 12);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    const uint32_t mins_lo = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[2] = mins_lo;
    u[0] &= k1;
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(u);
    out.scales = _mm256_mul_ps(bytes_to_float(bytes, false), _mm256_set1_ps(load_half(b)));
    out.mins = _mm256_mul_ps(bytes_to_float(bytes + 8, false),
                             _mm256_set1_ps(-0.125f * load_half(b + 2)));
    out.qs = b + 16;
  }
  static void step(WeightRow, int64_t s, const Group& g, Step& w) {
    const int j = static_cast<int>(s % 8);
    const __m256i raw = load256(g.qs + 32 * (j / 2));
    w.q = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0F));
    const __m256i idx = _mm256_set1_epi32(j);
    w.scale = _mm256_permutevar8x32_ps(g.scales, idx);
    w.min = _mm256_permutevar8x32_ps(g.mins, idx);
  }
};

template <> struct Fmt<QuantFormat::q6_k> {
  static constexpr bool kSigned = true, kHasMin = false, kOffset8 = false;
  static constexpr int kGroupSteps = 8;
  struct Group {
    const uint8_t* b;
    __m256 scales[2];  // d * sc_0..7, d * sc_8..15
  };
  static void group(WeightRow row, int64_t g, Group& out) {
    out.b = row.p + g * 210;
    const __m256 d = _mm256_set1_ps(load_half(out.b + 208));
    out.scales[0] = _mm256_mul_ps(bytes_to_float(out.b + 192, true), d);
    out.scales[1] = _mm256_mul_ps(bytes_to_float(out.b + 200, true), d);
  }
  static void step(WeightRow, int64_t s, const Group& g, Step& w) {
    const int j = static_cast<int>(s % 8), half = j / 4, part = j % 4;
    const __m256i ql = load256(g.b + 64 * half + 32 * (part % 2));
    const __m256i lo = _mm256_and_si256(part / 2 ? _mm256_srli_epi16(ql, 4) : ql,
                                        _mm256_set1_epi8(0x0F));
    const __m256i qh = load256(g.b + 128 + 32 * half);
    __m256i hi;  // bits 4-5 of each code: ((qh >> 2 * part) & 3) << 4
    switch (part) {
      case 0: hi = _mm256_slli_epi16(qh, 4); break;
      case 1: hi = _mm256_slli_epi16(qh, 2); break;
      case 2: hi = qh; break;
      default: hi = _mm256_srli_epi16(qh, 2); break;
    }
    hi = _mm256_and_si256(hi, _mm256_set1_epi8(0x30));
    w.q = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
    const int a = 2 * part, b = a + 1;
    w.scale = _mm256_permutevar8x32_ps(g.scales[half], _mm256_setr_epi32(a, a, a, a, b, b, b, b));
  }
};

inline float hsum(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// ---- the register tile ---------------------------------------------------------------

struct Avx2Kernel {
  template <QuantFormat F> static constexpr int rows() { return 2; }
  template <QuantFormat F> static constexpr int tokens() { return 4; }
  static constexpr int kGemvRows = 4;

  template <QuantFormat F, int R, int C>
  static void tile(const QuantArgs& a, const ActBlocks& x, int64_t t0, int64_t n0, int64_t k0,
                   int64_t k_len, bool accumulate) {
    using T = Fmt<F>;
    const int64_t k_total = a.in_features, nb = k_total / kActBlock;
    WeightRow rows[R];
    for (int r = 0; r < R; ++r) rows[r] = weight_row(a, n0 + r);
    __m256 acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    typename T::Group grp[R];
    // One token streams its rows once, R adjacent rows at a time: fetch the same place in the
    // next R rows, a line per `every` steps (the hardware prefetcher alone left the kernel
    // waiting on memory: 2 threads, 16384 x 4096 q4_0 10-11 -> 14-21 GB/s, q6_k 7-9 -> 16-25).
    const int64_t step_bytes = a.w_row_bytes / (k_total / 32);
    constexpr int every = F == QuantFormat::q8_0 ? 1 : F == QuantFormat::q6_k ? 2 : 3;
    const int64_t ahead = R * a.w_row_bytes;
    const bool prefetch = C == 1 && rows[0].lane < 0;
    for (int64_t s = k0 / 32; s < (k0 + k_len) / 32; ++s) {
      if (prefetch && s % every == 0)
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(rows[r].p) + s * step_bytes + ahead,
                       _MM_HINT_T0);
      __m256i xv[C], x8[C];
      __m256 dx[C], sx[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        const int64_t xb = (t0 + c) * nb + s;
        xv[c] = load256(reinterpret_cast<const uint8_t*>(x.q + (t0 + c) * k_total + 32 * s));
        dx[c] = _mm256_broadcast_ss(x.d + xb);
        if constexpr (T::kHasMin) sx[c] = _mm256_broadcast_ss(x.s + xb);
        if constexpr (T::kOffset8)  // 8 * the sum of each lane's 4 codes
          x8[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(8), xv[c]), ones);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (s % T::kGroupSteps == 0) T::group(rows[r], s / T::kGroupSteps, grp[r]);
        Step w;
        T::step(rows[r], s, grp[r], w);
        const __m256i wu = T::kSigned ? _mm256_abs_epi8(w.q) : w.q;
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const __m256i xs = T::kSigned ? _mm256_sign_epi8(xv[c], w.q) : xv[c];
          __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xs), ones);
          if constexpr (T::kOffset8) dot = _mm256_sub_epi32(dot, x8[c]);
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(w.scale, dx[c]),
                                      acc[r][c]);
          if constexpr (T::kHasMin) acc[r][c] = _mm256_fmadd_ps(w.min, sx[c], acc[r][c]);
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      float* o = a.out + (t0 + c) * a.out_row_stride + n0;
      for (int r = 0; r < R; ++r)
        o[r] = (accumulate ? o[r] : a.bias ? a.bias[n0 + r] : 0.0f) + hsum(acc[r][c]);
    }
  }

  // One block per iteration; a bit-exact copy of the portable quantiser's arithmetic.
  static void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(3.40282347e+38f);
    for (int64_t b = 0; b < k / kActBlock; ++b) {
      __m256 v[4], m = _mm256_setzero_ps();
      int bad = 0;
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
        const __m256 av = _mm256_and_ps(v[i], abs_mask);
        bad |= _mm256_movemask_ps(_mm256_cmp_ps(av, big, _CMP_NLE_UQ));
        m = _mm256_max_ps(m, av);
      }
      const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
      const float db = amax / 127.0f, inv = db != 0.0f && !bad ? 1.0f / db : 0.0f;
      const __m256 iv = _mm256_set1_ps(inv);
      __m256i qi[4];
      for (int i = 0; i < 4; ++i)  // NaN * 0 is still NaN: zero the codes of a bad block
        qi[i] = bad ? _mm256_setzero_si256() : _mm256_cvtps_epi32(_mm256_mul_ps(v[i], iv));
      const __m256i sum4 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]),
                                            _mm256_add_epi32(qi[2], qi[3]));
      const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum4), _mm256_extracti128_si256(sum4, 1));
      const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
      const int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_srli_epi64(s2, 32)));
      // packs interleave 128-bit lanes; the permute puts the 32 codes back in order
      const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
      const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), p8);
      d[b] = bad ? __builtin_nanf("") : db;
      s[b] = d[b] * static_cast<float>(sum);
    }
  }
};

}  // namespace

void quant_matmul_avx2(const QuantArgs& a, const ActBlocks& x) { run_any<Avx2Kernel>(a, x); }

}  // namespace quant_detail
}  // namespace engine
