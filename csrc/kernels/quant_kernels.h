// Internal to the quantised matmul kernels (quant_matmul*.cpp): the validated
// arguments, the activation blocks, the per-ISA entry points, and the blocking
// driver the portable and AVX2 kernels share. (The AVX-512 VNNI kernels lay x out
// their own way, tokens in vector lanes: quant_avx512.h.)
//
// x is quantised on the fly, per token row, to q8 blocks of 32 values (as llama.cpp's
// vec_dot does): d = max|x| / 127, q = round-to-nearest-even(x / d) in [-127, 127], so
// that each weight block meets its activation block in an integer dot product. A block
// holding NaN or an infinity gets d = NaN, which makes its whole output row NaN.
//
// The portable and AVX2 files each define a Kernel policy in its own anonymous namespace
// (code compiled for an ISA must never stand in for baseline code at link time):
//
//   struct Kernel {
//     template <QuantFormat F> static constexpr int rows();        // weight rows per tile
//     template <QuantFormat F> static constexpr int tokens();      // tokens per tile (> 1)
//     static constexpr int kGemvRows;                              // rows per tile, 1 token
//     // out[(t0 + c) * os + n0 + r] = (accumulate ? out : bias ? bias[n0 + r] : 0)
//     //     + sum over values [k0, k0 + k_len) of w[n0 + r] * x[t0 + c]
//     template <QuantFormat F, int R, int C>
//     static void tile(const QuantArgs& a, const ActBlocks& x, int64_t t0, int64_t n0,
//                      int64_t k0, int64_t k_len, bool accumulate);
//     static void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s);
//   };
//
// Every (row, token) pair is computed by the same sequence of operations whatever the
// tile shape, and K is cut into the same blocks for one token as for many, so a row's
// result does not depend on the batch it is in.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "engine/convert.h"
#include "engine/ops.h"

namespace engine {
namespace quant_detail {

constexpr int kActBlock = 32;  // values per activation block

// After validation: every pointer is valid for the extents below, out overlaps nothing,
// num_tokens, out_features > 0 and in_features is a positive multiple of the block size.
struct QuantArgs {
  const float* x;        // [num_tokens, in_features], row stride x_row_stride
  int64_t x_row_stride;
  const uint8_t* w;      // [out_features, w_row_bytes] contiguous blocks
  int64_t w_row_bytes;
  int64_t w_block_bytes;     // bytes per 32 values (a 32-value format; unused for k-quants)
  int64_t interleaved_rows;  // rows [0, interleaved_rows) in 4-row tiles (see below)
  QuantFormat format;
  const float* bias;     // [out_features] or nullptr
  float* out;            // [num_tokens, out_features], row stride out_row_stride
  int64_t out_row_stride;
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  const Prefetch* prefetch = nullptr;  // requested by the one-token AVX-512 kernel
};

// x quantised to q8 blocks; nb = in_features / 32 blocks per token row.
struct ActBlocks {
  int8_t* q;  // [num_tokens, in_features]
  float* d;   // [num_tokens, nb]: each block's scale (NaN where x was not finite)
  float* s;   // [num_tokens, nb]: d * sum(q), what a weight block's min multiplies
};

void quant_matmul_portable(const QuantArgs& a, const ActBlocks& x);
#if defined(ENGINE_X86)
void quant_matmul_avx2(const QuantArgs& a, const ActBlocks& x);
void quant_matmul_avx512_vnni(const QuantArgs& a);  // quantises x into its own tile layout
void quant_gemv_avx512_vnni(const QuantArgs& a);    // one token; the same bits per row

// A grow-only, 64-byte aligned buffer of at least `bytes`, one per (calling thread, slot),
// valid until the same thread asks for the same slot again. Defined in a file built for no
// particular ISA: std::vector instantiated under `#pragma GCC target` fails to build with
// GCC 13's libstdc++ (its always_inline allocator then has a mismatched target).
enum class Scratch { codes, scales, tiles, count };
void* thread_scratch(Scratch slot, size_t bytes);
#endif

namespace {

// The 4-row tiled layout (interleave 4) of the 32-value formats q8_0, q4_0 and q4_1, which
// the one-token AVX-512 kernel reads as one stream with no shuffling: each group of 4 rows
// (rows 4g .. 4g + 3, 4 * row_bytes from the group's start) holds, per quad of blocks
// (blocks 4q .. 4q + 3, 16 blocks' bytes from the group's start + 16q blocks), the 16
// (block j, row r) pairs:
//   heads  f16 d[16], pair (j, r) at 4j + r (q4_1: then f16 m[16] the same way);
//   codes  chunks of 64 bytes, chunk c's 32-bit lane 4r + j holding the pair's quant bytes
//          4c .. 4c + 3 (q4_0 / q4_1: 4 chunks of nibble bytes; q8_0: 8 chunks of int8
//          codes): a row's 4 blocks share a 128-bit lane, met by one broadcast of the
//          token's 4 blocks.
// Blocks past the last whole quad follow as whole blocks, the 4 rows' block b in turn (row r's
// at the group's start + (4b + r) blocks); rows past the last whole group as plain rows.
constexpr int kTileRows = 4;

constexpr int head_bytes(QuantFormat f) { return f == QuantFormat::q4_1 ? 4 : 2; }

// Within a quad, where block j of row r keeps its f16 head piece k (d, then q4_1's m) and its
// quant word c (bytes 4c .. 4c + 3), for a format of `head` head bytes.
inline int64_t tile_head_at(int j, int r, int k) { return 32 * k + 2 * (4 * j + r); }
inline int64_t tile_word_at(int head, int j, int r, int64_t c) {
  return 16 * head + 64 * c + 4 * (4 * r + j);
}

// Row n of the weight, and its block b as GGUF's bytes.
struct WeightRow {
  const uint8_t* p;  // plain: the row's first block; tiled: its group's start
  int64_t bb;        // bytes per block (32-value formats; 0 for the k-quants, always plain)
  int lane;          // tiled: the row within its group; plain: -1
  int head;          // tiled: head bytes per block
  int64_t quads;     // tiled: whole quads per row

  // A pointer to the block's bytes, in place or (a tiled quad's block) gathered into buf
  // (at least 34 bytes).
  const uint8_t* block(int64_t b, uint8_t* buf) const {
    if (lane < 0) return p + b * bb;
    if (b >= 4 * quads) return p + (4 * b + lane) * bb;
    const uint8_t* q = p + (b / 4) * 16 * bb;
    const int j = static_cast<int>(b % 4);
    for (int k = 0; k < head / 2; ++k) std::memcpy(buf + 2 * k, q + tile_head_at(j, lane, k), 2);
    const int words = bb == 34 ? 8 : 4;  // q8_0's 32 codes, or q4's 16 nibble bytes
    for (int c = 0; c < words; ++c)
      std::memcpy(buf + head + 4 * c, q + tile_word_at(head, j, lane, c), 4);
    return buf;
  }
};

inline WeightRow weight_row(const QuantArgs& a, int64_t n) {
  if (n >= a.interleaved_rows) return {a.w + n * a.w_row_bytes, a.w_block_bytes, -1, 0, 0};
  const int64_t r = n % kTileRows;
  return {a.w + (n - r) * a.w_row_bytes, a.w_block_bytes, static_cast<int>(r), head_bytes(a.format),
          a.in_features / 32 / 4};
}

inline float half_to_float(const uint8_t* p) {  // little-endian f16 at any alignment
  return f16_to_f32(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}

// Cache blocking: a tile's C token rows of q8 blocks over kBlockK values stay in L1,
// a block of kBlockTokens token rows in L2 while a chunk of about kChunkBytes of weight
// rows meets all of them.
constexpr int64_t kBlockK = 2048;
constexpr int64_t kBlockTokens = 64;
constexpr int64_t kChunkBytes = 96 * 1024;
// Below this many multiply-adds a parallel region costs more than it saves.
constexpr double kMinParallelWork = 64.0 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Kernel::tile<F, R, C> for the runtime token count c in [1, C].
template <class Kernel, QuantFormat F, int R, int C>
inline void tile_upto(int c, const QuantArgs& a, const ActBlocks& x, int64_t t0, int64_t n0,
                      int64_t k0, int64_t k_len, bool accumulate) {
  if constexpr (C > 1) {
    if (c < C) {
      tile_upto<Kernel, F, R, C - 1>(c, a, x, t0, n0, k0, k_len, accumulate);
      return;
    }
  }
  Kernel::template tile<F, R, C>(a, x, t0, n0, k0, k_len, accumulate);
}

// One token (decode): stream each weight row once, R rows at a time.
template <class Kernel, QuantFormat F>
void gemv_rows(const QuantArgs& a, const ActBlocks& x, int64_t n0, int64_t n1) {
  constexpr int R = Kernel::kGemvRows;
  const int64_t k_total = a.in_features;
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    for (int64_t k0 = 0; k0 < k_total; k0 += kBlockK)
      Kernel::template tile<F, R, 1>(a, x, 0, n, k0, std::min(kBlockK, k_total - k0), k0 > 0);
  for (; n < n1; ++n)
    for (int64_t k0 = 0; k0 < k_total; k0 += kBlockK)
      Kernel::template tile<F, 1, 1>(a, x, 0, n, k0, std::min(kBlockK, k_total - k0), k0 > 0);
}

// Many tokens: token blocks, weight chunks, K blocks, then register tiles.
template <class Kernel, QuantFormat F>
void gemm_rows(const QuantArgs& a, const ActBlocks& x, int64_t n0, int64_t n1) {
  constexpr int R = Kernel::template rows<F>();
  constexpr int C = Kernel::template tokens<F>();
  const int64_t k_total = a.in_features;
  const int64_t block_k = std::min(kBlockK, k_total);
  const int64_t block_bytes = a.w_row_bytes * block_k / k_total;
  const int64_t chunk_rows = std::max<int64_t>(R, kChunkBytes / block_bytes / R * R);
  for (int64_t t0 = 0; t0 < a.num_tokens; t0 += kBlockTokens) {
    const int64_t t1 = std::min(a.num_tokens, t0 + kBlockTokens);
    for (int64_t c0 = n0; c0 < n1; c0 += chunk_rows) {
      const int64_t c1 = std::min(n1, c0 + chunk_rows);
      for (int64_t k0 = 0; k0 < k_total; k0 += block_k) {
        const int64_t k_len = std::min(block_k, k_total - k0);
        for (int64_t t = t0; t < t1; t += C) {
          const int c = static_cast<int>(std::min<int64_t>(C, t1 - t));
          int64_t n = c0;
          for (; n + R <= c1; n += R)
            tile_upto<Kernel, F, R, C>(c, a, x, t, n, k0, k_len, k0 > 0);
          for (; n < c1; ++n) tile_upto<Kernel, F, 1, C>(c, a, x, t, n, k0, k_len, k0 > 0);
        }
      }
    }
  }
}

// One parallel region: the threads quantise the token rows, then each computes one
// contiguous range of output rows (decode splits the weight stream, prefill the work).
template <class Kernel, QuantFormat F>
void run_format(const QuantArgs& a, const ActBlocks& x) {
  constexpr int kAlign = 4;
  const int64_t k_total = a.in_features, nb = k_total / kActBlock;
  const int64_t num_threads = std::max(1, omp_get_max_threads());
  const int64_t part_rows = ceil_div(ceil_div(a.out_features, num_threads), kAlign) * kAlign;
  const int64_t num_parts = ceil_div(a.out_features, part_rows);
  const double work = static_cast<double>(a.num_tokens) * a.out_features * k_total;
#pragma omp parallel if (work >= kMinParallelWork && num_parts > 1)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.num_tokens; ++t)
      Kernel::quantize_row(a.x + t * a.x_row_stride, k_total, x.q + t * k_total, x.d + t * nb,
                           x.s + t * nb);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_parts; ++i) {
      const int64_t n0 = i * part_rows, n1 = std::min(a.out_features, n0 + part_rows);
      if (a.num_tokens == 1)
        gemv_rows<Kernel, F>(a, x, n0, n1);
      else
        gemm_rows<Kernel, F>(a, x, n0, n1);
    }
  }
}

template <class Kernel>
void run_any(const QuantArgs& a, const ActBlocks& x) {
  switch (a.format) {
    case QuantFormat::q8_0: return run_format<Kernel, QuantFormat::q8_0>(a, x);
    case QuantFormat::q4_0: return run_format<Kernel, QuantFormat::q4_0>(a, x);
    case QuantFormat::q4_1: return run_format<Kernel, QuantFormat::q4_1>(a, x);
    case QuantFormat::q4_k: return run_format<Kernel, QuantFormat::q4_k>(a, x);
    case QuantFormat::q6_k: return run_format<Kernel, QuantFormat::q6_k>(a, x);
  }
}

}  // namespace
}  // namespace quant_detail
}  // namespace engine
