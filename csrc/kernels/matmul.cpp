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
  static void convert(const W* w, int64_t n, float* out) {
    for (int64_t k = 0; k < n; ++k) out[k] = to_f32(w[k]);
  }
  static constexpr int kLanes = 8;  // independent partial sums per (row, token)

  template <int R, int C, class W>
  static void tile(const float* x, int64_t xs, const W* w, int64_t ws, int64_t k_len,
                   const float* bias, bool accumulate, float* out, int64_t os) {
    float acc[R][C][kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= k_len; k += kLanes) {
      float wv[R][kLanes];
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < kLanes; ++l) wv[r][l] = to_f32(w[r * ws + k + l]);
      for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r)
          for (int l = 0; l < kLanes; ++l) acc[r][c][l] += wv[r][l] * x[c * xs + k + l];
    }
    for (; k < k_len; ++k)
      for (int r = 0; r < R; ++r) {
        const float wk = to_f32(w[r * ws + k]);
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

void validate(const TensorView& x, const TensorView& w, const TensorView& bias,
              const TensorView& out) {
  ENGINE_CHECK(x.dtype == DType::f32 && x.ndim == 2, kOp,
               "x must be float32 [num_tokens, in_features], got " + x.describe());
  check_row_contiguous(x, kOp, "x");
  const int64_t num_tokens = x.shape[0], in_features = x.shape[1];

  const bool w_dtype_ok = w.dtype == DType::f32 || w.dtype == DType::f16 || w.dtype == DType::bf16;
  ENGINE_CHECK(w_dtype_ok && w.ndim == 2 && w.shape[1] == in_features, kOp,
               "w must be float32 or float16 or bfloat16 [out_features, " +
                   std::to_string(in_features) + "], got " + w.describe());
  if (w.numel() > 0) check_contiguous(w, kOp, "w");  // is_contiguous() rejects some empty views
  const int64_t out_features = w.shape[0];

  if (present(bias)) {
    ENGINE_CHECK(
        bias.dtype == DType::f32 && bias.ndim == 1 && bias.shape[0] == out_features, kOp,
        "bias must be float32 [" + std::to_string(out_features) + "], got " + bias.describe());
    check_contiguous(bias, kOp, "bias");
  }

  ENGINE_CHECK(out.dtype == DType::f32 && out.ndim == 2 && out.shape[0] == num_tokens &&
                   out.shape[1] == out_features,
               kOp,
               "out must be float32 [" + std::to_string(num_tokens) + ", " +
                   std::to_string(out_features) + "], got " + out.describe());
  check_row_contiguous(out, kOp, "out");
  ENGINE_CHECK(num_tokens <= 1 || out_features == 0 || out.strides[0] >= out_features, kOp,
               "out rows overlap: row stride " + std::to_string(out.strides[0]) + " < " +
                   std::to_string(out_features));
  ENGINE_CHECK(!overlaps(out, x), kOp, "out must not overlap x");
  ENGINE_CHECK(!overlaps(out, w), kOp, "out must not overlap w");
  ENGINE_CHECK(!present(bias) || !overlaps(out, bias), kOp, "out must not overlap bias");
}

// in_features == 0: the empty sum, so out = bias (or 0).
void fill_bias(const TensorView& bias, const TensorView& out) {
  for (int64_t t = 0; t < out.shape[0]; ++t) {
    float* o = out.ptr<float>() + t * out.strides[0];
    for (int64_t n = 0; n < out.shape[1]; ++n) o[n] = present(bias) ? bias.ptr<float>()[n] : 0.0f;
  }
}

}  // namespace

void matmul(const TensorView& x, const TensorView& w, const TensorView& bias,
            const TensorView& out) {
  validate(x, w, bias, out);
  matmul_detail::MatmulArgs a;
  a.x = x.ptr<const float>();
  a.x_row_stride = x.strides[0];
  a.w = w.data;
  a.w_dtype = w.dtype;
  a.bias = present(bias) ? bias.ptr<const float>() : nullptr;
  a.out = out.ptr<float>();
  a.out_row_stride = out.strides[0];
  a.num_tokens = x.shape[0];
  a.in_features = x.shape[1];
  a.out_features = w.shape[0];
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

}  // namespace engine
