// matmul: out = x @ w^T (+ bias). The launcher validates and dispatches on the
// instruction set; the portable kernel (plain C++, auto-vectorised) lives here,
// the intrinsics kernels in matmul_avx2.cpp and matmul_avx512.cpp. All share the
// blocking driver in matmul_kernels.h; weights are converted to f32 per vector
// inside the inner loop, never as a whole.
#include <algorithm>
#include <cstdint>
#include <string>

#include "engine/check.h"
#include "engine/isa.h"
#include "engine/ops.h"
#include "matmul_kernels.h"

namespace engine {
namespace matmul_detail {
namespace {

// ---- portable kernel -------------------------------------------------------------

struct PortableKernel {
  static constexpr int kRows = 4;
  static constexpr int kTokens = 4;
  static constexpr int kGemvRows = 4;
  static constexpr bool kPanels = true;

  template <class W>
  static void convert(const W* w, int64_t ss, int64_t n, float* out) {
    for (int64_t k = 0; k < n; ++k) out[k] = to_f32(w[w_at(0, k, 0, ss)]);
  }
  static constexpr int kLanes = 8;  // independent partial sums per (row, token); divides 16

  template <int R, int C, class W>
  static void tile(const float* x, int64_t xs, const W* w, int64_t rs, int64_t ss, int64_t k_len,
                   const float* bias, bool accumulate, float* out, int64_t os) {
    float acc[R][C][kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= k_len; k += kLanes) {
      float wv[R][kLanes];
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < kLanes; ++l) wv[r][l] = to_f32((w + w_at(r, k, rs, ss))[l]);
      for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r)
          for (int l = 0; l < kLanes; ++l) acc[r][c][l] += wv[r][l] * x[c * xs + k + l];
    }
    for (; k < k_len; ++k)
      for (int r = 0; r < R; ++r) {
        const float wk = to_f32(w[w_at(r, k, rs, ss)]);
        for (int c = 0; c < C; ++c) acc[r][c][0] += wk * x[c * xs + k];
      }
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) {
        float s = 0.0f;
        for (int l = 0; l < kLanes; ++l) s += acc[r][c][l];
        float& o = out[c * os + r];
        o = (accumulate ? o : bias ? bias[r] : 0.0f) + s;
      }
  }
};

}  // namespace

void matmul_portable(const MatmulArgs& a) { run_matmul_any<PortableKernel>(a); }

}  // namespace matmul_detail

// ---- launcher --------------------------------------------------------------------

namespace {

constexpr const char* kOp = "matmul";

// in_features == 0: the empty sum, so out = bias (or 0).
void fill_bias(const TensorView& bias, const TensorView& out) {
  for (int64_t t = 0; t < out.shape[0]; ++t) {
    float* o = out.ptr<float>() + t * out.strides[0];
    for (int64_t n = 0; n < out.shape[1]; ++n) o[n] = present(bias) ? bias.ptr<float>()[n] : 0.0f;
  }
}

void run(const matmul_detail::MatmulArgs& a, const TensorView& bias, const TensorView& out) {
  if (a.num_tokens == 0 || a.out_features == 0) return;
  if (a.in_features == 0) return fill_bias(bias, out);
  switch (current_isa()) {
#if defined(ENGINE_X86)
    case Isa::avx512: return matmul_detail::matmul_avx512(a);
    case Isa::avx2: return matmul_detail::matmul_avx2(a);
#endif
    default: return matmul_detail::matmul_portable(a);
  }
}

matmul_detail::MatmulArgs args(const TensorView& x, const TensorView& w, bool packed,
                               int64_t out_features, const TensorView& bias,
                               const TensorView& out) {
  matmul_detail::MatmulArgs a;
  a.x = x.ptr<const float>();
  a.x_row_stride = x.strides[0];
  a.w = w.data;
  a.w_packed = packed;
  a.w_dtype = w.dtype;
  a.bias = present(bias) ? bias.ptr<const float>() : nullptr;
  a.out = out.ptr<float>();
  a.out_row_stride = out.strides[0];
  a.num_tokens = x.shape[0];
  a.in_features = x.shape[1];
  a.out_features = out_features;
  return a;
}

}  // namespace

void matmul(const TensorView& x, const TensorView& w, const TensorView& bias,
            const TensorView& out) {
  check_float_linear(x, w, bias, out, kOp);
  run(args(x, w, false, w.shape[0], bias, out), bias, out);
}

void matmul_packed(const TensorView& x, const TensorView& w, int64_t out_features,
                   const TensorView& bias, const TensorView& out) {
  const char* op = "matmul_packed";
  check_linear_x(x, op);
  using matmul_detail::ceil_div;
  using matmul_detail::kPackRows;
  const int64_t groups = ceil_div(std::max<int64_t>(out_features, 0), kPackRows);
  const int64_t steps = ceil_div(x.shape[1], 16);
  ENGINE_CHECK(out_features >= 0 && is_float_weight(w.dtype) && w.ndim == 4 &&
                   w.shape[0] == groups && w.shape[1] == steps && w.shape[2] == kPackRows &&
                   w.shape[3] == 16,
               op,
               "w must be float32 or float16 or bfloat16 [" + std::to_string(groups) + ", " +
                   std::to_string(steps) + ", 8, 16] (" + std::to_string(out_features) +
                   " rows of " + std::to_string(x.shape[1]) + " packed), got " + w.describe());
  if (w.numel() > 0) check_contiguous(w, op, "w");
  check_linear_bias_out(x, w, bias, out, out_features, op);
  run(args(x, w, true, out_features, bias, out), bias, out);
}

}  // namespace engine
