// Internal to the matmul kernels: the validated arguments, the per-ISA entry
// points, and the cache-blocking driver that every ISA shares.
//
// Each kernel file defines a Kernel policy (in its own anonymous namespace, so
// that code compiled for AVX-512 never stands in for code compiled for the
// baseline at link time) and instantiates run_matmul<Kernel, W> with it:
//
//   struct Kernel {
//     static constexpr int kRows;       // weight rows per register tile (T > 1)
//     static constexpr int kTokens;     // tokens per register tile (T > 1)
//     static constexpr int kGemvRows;   // weight rows per register tile (T == 1)
//     static constexpr bool kPanels;    // copy x blocks and weight chunks into padded panels
//     // out[k] = w[w_at(0, k, 0, ss)] for k < n, exactly
//     template <class W> static void convert(const W* w, int64_t ss, int64_t n, float* out);
//     // out[c * os + r] = (accumulate ? out[..] : bias ? bias[r] : 0)
//     //                   + sum over k < k_len of x[c * xs + k] * w[w_at(r, k, rs, ss)]
//     template <int R, int C, class W>
//     static void tile(const float* x, int64_t xs, const W* w, int64_t rs, int64_t ss,
//                      int64_t k_len, const float* bias, bool accumulate, float* out, int64_t os);
//   };
//
// Weights are read through two strides: element (r, k) of a tile whose first row starts at
// w is w[w_at(r, k, rs, ss)]. Rows (matmul): rs = in_features, ss = 16, so w[r * rs + k].
// Packed (matmul_packed): groups of kPackRows rows, each 16-column step of a group holding
// its rows' 16 values one after another (rs = 16, ss = 16 * kPackRows), so that decode
// reads one stream instead of a stream per row.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "engine/convert.h"
#include "engine/tensor.h"

namespace engine {
namespace matmul_detail {

// After validation: every pointer is valid for the extents below, out does not
// overlap the inputs, num_tokens, in_features, out_features > 0.
struct MatmulArgs {
  const float* x;          // [num_tokens, in_features], row stride x_row_stride
  int64_t x_row_stride;
  const void* w;           // [out_features, in_features] contiguous, or packed, dtype w_dtype
  bool w_packed;           // [ceil(out / kPackRows), ceil(in / 16), kPackRows, 16]
  DType w_dtype;
  const float* bias;       // [out_features] or nullptr
  float* out;              // [num_tokens, out_features], row stride out_row_stride
  int64_t out_row_stride;
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
};

void matmul_portable(const MatmulArgs& a);
#if defined(ENGINE_X86)
void matmul_avx2(const MatmulArgs& a);
void matmul_avx512(const MatmulArgs& a);
#endif

namespace {

// Cache blocking (the GotoBLAS loop nest with weights in the role of A): a block of
// kBlockTokens x kBlockK of x (512 KiB) and a chunk of about kChunkBytes of w stay
// in L2 while every token tile of the block meets every row of the chunk; a token
// tile's slice of x (kTokens x kBlockK floats) and one row group stay in L1.
constexpr int64_t kBlockK = 1024;
constexpr int64_t kBlockTokens = 128;
constexpr int64_t kChunkBytes = 128 * 1024;
// Below this many multiply-adds a parallel region costs more than it saves.
constexpr double kMinParallelWork = 64.0 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kPackRows = 8;

inline int64_t w_at(int64_t r, int64_t k, int64_t rs, int64_t ss) {
  return r * rs + (k >> 4) * ss + (k & 15);
}
inline int64_t w_row_stride(const MatmulArgs& a) { return a.w_packed ? 16 : a.in_features; }
inline int64_t w_step_stride(const MatmulArgs& a) { return a.w_packed ? 16 * kPackRows : 16; }

// Where row n's column k0 (a multiple of 16) is, in elements from a.w.
inline int64_t w_offset(const MatmulArgs& a, int64_t n, int64_t k0) {
  if (!a.w_packed) return n * a.in_features + k0;
  const int64_t group = ceil_div(a.in_features, 16) * 16 * kPackRows;
  return (n / kPackRows) * group + (k0 / 16) * 16 * kPackRows + (n % kPackRows) * 16;
}

// Calls Kernel::tile<R, c> for the runtime token count c in [1, C].
template <class Kernel, int R, int C, class W>
inline void tile_upto(int c, const float* x, int64_t xs, const W* w, int64_t rs, int64_t ss,
                      int64_t k_len, const float* bias, bool accumulate, float* out, int64_t os) {
  if constexpr (C > 1) {
    if (c < C) {
      tile_upto<Kernel, R, C - 1, W>(c, x, xs, w, rs, ss, k_len, bias, accumulate, out, os);
      return;
    }
  }
  Kernel::template tile<R, C, W>(x, xs, w, rs, ss, k_len, bias, accumulate, out, os);
}

// Row tiles of out[t0:t1, n0:n1] over columns [k0, k0 + k_len). x points at token t0's
// column k0, rows xs apart; row(n) is where weight row n's column k0 starts, read with
// strides rs, ss. Tiles start at multiples of RW from n0 (a multiple of RW), so a tile
// never spans two packed groups.
template <class Kernel, int RW, int CT, class W, class Rows>
void matmul_block(const MatmulArgs& a, const float* x, int64_t xs, Rows row, int64_t rs, int64_t ss,
                  int64_t k0, int64_t k_len, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  const int64_t os = a.out_row_stride;
  const bool accumulate = k0 > 0;
  for (int64_t t = t0; t < t1; t += CT) {
    const int c = static_cast<int>(std::min<int64_t>(CT, t1 - t));
    const float* xt = x + (t - t0) * xs;
    float* ot = a.out + t * os;
    int64_t n = n0;
    for (; n + RW <= n1; n += RW)
      tile_upto<Kernel, RW, CT, W>(c, xt, xs, row(n), rs, ss, k_len, a.bias ? a.bias + n : nullptr,
                                   accumulate, ot + n, os);
    for (; n < n1; ++n)
      tile_upto<Kernel, 1, CT, W>(c, xt, xs, row(n), rs, ss, k_len, a.bias ? a.bias + n : nullptr,
                                  accumulate, ot + n, os);
  }
}

// From this many tokens in a block, the block of x and each chunk of weights are first
// copied (16-bit weights converted to float32, exactly) into the thread's panels, whose
// rows are padded so that the tile's streams do not all map to the same L1 sets (rows a
// multiple of 4 KiB apart), and the register tiles run without a conversion per weight
// vector: 164 -> 190 GFLOP/s for f16 on 2 cores. The same products and sums either way.
constexpr int64_t kPanelTokens = 12;
constexpr int64_t kPanelPad = 16;

inline float* thread_panel(int which, int64_t n) {
  static thread_local std::vector<float> panels[2];
  if (static_cast<int64_t>(panels[which].size()) < n) panels[which].resize(n);
  return panels[which].data();
}

// out[:, n0:n1] for all tokens: K blocks, token blocks, weight chunks, then tiles.
template <class Kernel, int RW, int CT, class W>
void matmul_rows(const MatmulArgs& a, int64_t block_k, int64_t n0, int64_t n1) {
  const int64_t num_tokens = a.num_tokens, in_features = a.in_features;
  const int64_t chunk_rows = std::max<int64_t>(
      RW, kChunkBytes / (block_k * static_cast<int64_t>(sizeof(W))) / RW * RW);
  const W* w = static_cast<const W*>(a.w);
  const int64_t ss = w_step_stride(a);
  const int64_t ps = std::min(block_k, in_features) + kPanelPad;
  for (int64_t k0 = 0; k0 < in_features; k0 += block_k) {
    const int64_t k_len = std::min(block_k, in_features - k0);
    for (int64_t t0 = 0; t0 < num_tokens; t0 += kBlockTokens) {
      const int64_t t1 = std::min(num_tokens, t0 + kBlockTokens);
      const float* x = a.x + t0 * a.x_row_stride + k0;
      const bool panels = Kernel::kPanels && t1 - t0 >= kPanelTokens;
      if (panels) {
        float* xp = thread_panel(0, kBlockTokens * ps);
        for (int64_t t = 0; t < t1 - t0; ++t)
          std::copy(x + t * a.x_row_stride, x + t * a.x_row_stride + k_len, xp + t * ps);
        x = xp;
      }
      for (int64_t c0 = n0; c0 < n1; c0 += chunk_rows) {
        const int64_t c1 = std::min(n1, c0 + chunk_rows);
        if (panels) {
          float* wp = thread_panel(1, chunk_rows * ps);
          for (int64_t r = 0; r < c1 - c0; ++r)
            Kernel::convert(w + w_offset(a, c0 + r, k0), ss, k_len, wp + r * ps);
          auto row = [&](int64_t n) { return wp + (n - c0) * ps; };
          matmul_block<Kernel, RW, CT, float>(a, x, ps, row, ps, 16, k0, k_len, t0, t1, c0, c1);
        } else {
          auto row = [&](int64_t n) { return w + w_offset(a, n, k0); };
          matmul_block<Kernel, RW, CT, W>(a, x, a.x_row_stride, row, w_row_stride(a), ss, k0, k_len,
                                          t0, t1, c0, c1);
        }
      }
    }
  }
}

// One token (decode): each row group is streamed start to end, K block by K block, with
// the same blocks (and so the same summation order) as matmul_rows.
template <class Kernel, int RW, int CT, class W>
void gemv_rows(const MatmulArgs& a, int64_t block_k, int64_t n0, int64_t n1) {
  const W* w = static_cast<const W*>(a.w);
  const int64_t in_features = a.in_features, rs = w_row_stride(a), ss = w_step_stride(a);
  int64_t n = n0;
  for (; n + RW <= n1; n += RW)
    for (int64_t k0 = 0; k0 < in_features; k0 += block_k)
      Kernel::template tile<RW, 1, W>(a.x + k0, 0, w + w_offset(a, n, k0), rs, ss,
                                      std::min(block_k, in_features - k0),
                                      a.bias ? a.bias + n : nullptr, k0 > 0, a.out + n, 0);
  for (; n < n1; ++n)
    for (int64_t k0 = 0; k0 < in_features; k0 += block_k)
      Kernel::template tile<1, 1, W>(a.x + k0, 0, w + w_offset(a, n, k0), rs, ss,
                                     std::min(block_k, in_features - k0),
                                     a.bias ? a.bias + n : nullptr, k0 > 0, a.out + n, 0);
}

// Gives each thread one contiguous range of out_features, starting at a multiple of
// kPackRows (RW divides it: tiles stay inside packed groups).
template <class Kernel, int RW, int CT, class W>
void run_chunks(const MatmulArgs& a, int64_t block_k) {
  static_assert(kPackRows % RW == 0, "a row tile must not span two packed groups");
  const int64_t num_rows = a.out_features;
  const int64_t num_threads = std::max(1, omp_get_max_threads());
  const int64_t part_rows = ceil_div(ceil_div(num_rows, num_threads), kPackRows) * kPackRows;
  const int64_t num_parts = ceil_div(num_rows, part_rows);
  const double work = static_cast<double>(a.num_tokens) * num_rows * a.in_features;
#pragma omp parallel for schedule(static) if (work >= kMinParallelWork && num_parts > 1)
  for (int64_t i = 0; i < num_parts; ++i) {
    const int64_t n0 = i * part_rows;
    if constexpr (CT == 1)
      gemv_rows<Kernel, RW, CT, W>(a, block_k, n0, std::min(num_rows, n0 + part_rows));
    else
      matmul_rows<Kernel, RW, CT, W>(a, block_k, n0, std::min(num_rows, n0 + part_rows));
  }
}

template <class Kernel, class W>
void run_matmul(const MatmulArgs& a) {
  if (a.num_tokens == 1) {
    // Decode (GEMV): memory-bound; stream each weight row once. K is split into the same
    // blocks as for many tokens, so a row's result never depends on the batch it is in
    // (the same summation order: batch-invariant outputs).
    run_chunks<Kernel, Kernel::kGemvRows, 1, W>(a, std::min(a.in_features, kBlockK));
  } else {
    run_chunks<Kernel, Kernel::kRows, Kernel::kTokens, W>(a, std::min(a.in_features, kBlockK));
  }
}

template <class Kernel>
void run_matmul_any(const MatmulArgs& a) {
  with_float_type(a.w_dtype, [&](auto w) { run_matmul<Kernel, decltype(w)>(a); });
}

}  // namespace
}  // namespace matmul_detail
}  // namespace engine
