// kv_cache_write's float32 -> 16-bit conversions with AVX2 and F16C, 8 values a step;
// compiled with those flags (see CMakeLists.txt) and called only where the CPU has them.
// Both round to nearest even, bit for bit as convert.h's f32_to_f16 / f32_to_bf16.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace engine {
namespace kv_cache_detail {
namespace {

inline __m128i to_f16(__m256 v) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i h = _mm256_blendv_epi8(rounded, quiet, nan);  // 8 x 16 bits in 32-bit lanes
  const __m256i packed = _mm256_packus_epi32(h, h);           // lane-wise: 0-3 0-3 | 4-7 4-7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

template <__m128i (*Convert)(__m256)>
void convert_row(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), Convert(_mm256_loadu_ps(src + i)));
  if (i < n) {  // the tail through the same vector path, via a padded copy
    alignas(32) float in[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    alignas(16) uint16_t out[8];
    std::memcpy(in, src + i, static_cast<size_t>(n - i) * sizeof(float));
    _mm_store_si128(reinterpret_cast<__m128i*>(out), Convert(_mm256_load_ps(in)));
    std::memcpy(dst + i, out, static_cast<size_t>(n - i) * sizeof(uint16_t));
  }
}

}  // namespace

void to_f16_avx2(const float* src, int64_t n, uint16_t* dst) { convert_row<to_f16>(src, n, dst); }
void to_bf16_avx2(const float* src, int64_t n, uint16_t* dst) { convert_row<to_bf16>(src, n, dst); }

}  // namespace kv_cache_detail
}  // namespace engine
