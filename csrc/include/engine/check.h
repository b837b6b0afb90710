// Argument checks at the op boundary. Each failure throws std::invalid_argument
// naming the op, the argument, what was expected and what came; pybind11 turns
// it into ValueError. Messages are built only on failure: a decode step makes a few
// hundred op calls, and formatting every message up front cost about a microsecond each.
#pragma once

#include <initializer_list>
#include <stdexcept>
#include <string>

#include "engine/tensor.h"

namespace engine {

[[noreturn]] inline void fail(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

// ENGINE_CHECK(ok, op, msg): fail(op, msg) unless ok; msg is evaluated only then.
#define ENGINE_CHECK(ok, op, msg) ((ok) ? static_cast<void>(0) : ::engine::fail((op), (msg)))

inline std::string dtype_list(std::initializer_list<DType> allowed) {
  std::string s;
  for (DType d : allowed) {
    if (!s.empty()) s += " or ";
    s += dtype_name(d);
  }
  return s;
}

inline void check_dtype(const TensorView& t, const char* op, const char* arg,
                        std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  fail(op, std::string(arg) + " must be " + dtype_list(allowed) + ", got " + t.describe());
}

inline void check_same_dtype(const TensorView& t, const TensorView& like, const char* op,
                             const char* arg, const char* like_arg) {
  if (t.dtype == like.dtype) return;
  fail(op, std::string(arg) + " must have " + like_arg + "'s dtype " + dtype_name(like.dtype) +
               ", got " + t.describe());
}

inline void check_ndim(const TensorView& t, const char* op, const char* arg, int ndim) {
  ENGINE_CHECK(
      t.ndim == ndim, op,
      std::string(arg) + " must have " + std::to_string(ndim) + " dims, got " + t.describe());
}

// shape entries of -1 match anything.
inline void check_shape(const TensorView& t, const char* op, const char* arg,
                        std::initializer_list<int64_t> shape) {
  bool ok = t.ndim == static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) {
    if (ok && s >= 0 && t.shape[i] != s) ok = false;
    ++i;
  }
  if (ok) return;
  std::string want = "[";
  i = 0;
  for (int64_t s : shape) {
    if (i++) want += ", ";
    want += s < 0 ? std::string("*") : std::to_string(s);
  }
  fail(op, std::string(arg) + " must have shape " + want + "], got " + t.describe());
}

inline void check_contiguous(const TensorView& t, const char* op, const char* arg) {
  ENGINE_CHECK(t.is_contiguous(), op,
               std::string(arg) + " must be contiguous, got strides that are not");
}

inline void check_row_contiguous(const TensorView& t, const char* op, const char* arg) {
  ENGINE_CHECK(t.is_row_contiguous(), op,
               std::string(arg) + " must have a contiguous last dimension (stride 1)");
}

// An empty array has no rows to lay out, whatever strides numpy gave it.
inline void check_nonempty_row_contiguous(const TensorView& t, const char* op, const char* arg) {
  if (t.numel() > 0) check_row_contiguous(t, op, arg);
}

// Whether two views can touch a common byte: their spans [first byte, last byte + 1)
// intersect (non-negative strides). An empty view overlaps nothing.
inline bool overlaps(const TensorView& a, const TensorView& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto end = [](const TensorView& t) {
    int64_t last = 0;
    for (int i = 0; i < t.ndim; ++i) last += (t.shape[i] - 1) * t.strides[i];
    return static_cast<const char*>(t.data) + (last + 1) * dtype_size(t.dtype);
  };
  return static_cast<const char*>(a.data) < end(b) && static_cast<const char*>(b.data) < end(a);
}

// The checks every linear op shares (matmul, quant_matmul, the CUDA matmul), after its own
// checks of w: x float32 [num_tokens, in_features] with contiguous rows.
inline void check_linear_x(const TensorView& x, const char* op) {
  ENGINE_CHECK(x.dtype == DType::f32 && x.ndim == 2, op,
               "x must be float32 [num_tokens, in_features], got " + x.describe());
  check_row_contiguous(x, op, "x");
}

// bias absent or float32 [out_features], contiguous; out float32 [num_tokens, out_features]
// with contiguous rows that overlap neither each other nor x, w or bias.
inline void check_linear_bias_out(const TensorView& x, const TensorView& w,
                                  const TensorView& bias, const TensorView& out,
                                  int64_t out_features, const char* op) {
  const int64_t num_tokens = x.shape[0];
  if (present(bias)) {
    ENGINE_CHECK(
        bias.dtype == DType::f32 && bias.ndim == 1 && bias.shape[0] == out_features, op,
        "bias must be float32 [" + std::to_string(out_features) + "], got " + bias.describe());
    check_contiguous(bias, op, "bias");
  }
  ENGINE_CHECK(out.dtype == DType::f32 && out.ndim == 2 && out.shape[0] == num_tokens &&
                   out.shape[1] == out_features,
               op,
               "out must be float32 [" + std::to_string(num_tokens) + ", " +
                   std::to_string(out_features) + "], got " + out.describe());
  check_row_contiguous(out, op, "out");
  ENGINE_CHECK(num_tokens <= 1 || out_features == 0 || out.strides[0] >= out_features, op,
               "out rows overlap: row stride " + std::to_string(out.strides[0]) + " < " +
                   std::to_string(out_features));
  ENGINE_CHECK(!overlaps(out, x), op, "out must not overlap x");
  ENGINE_CHECK(!overlaps(out, w), op, "out must not overlap w");
  ENGINE_CHECK(!present(bias) || !overlaps(out, bias), op, "out must not overlap bias");
}

// The dtypes a float weight (matmul, matmul_packed) may have.
inline bool is_float_weight(DType d) {
  return d == DType::f32 || d == DType::f16 || d == DType::bf16;
}

// All of matmul's checks (CPU and CUDA): w float32, float16 or bfloat16
// [out_features, in_features], contiguous, with check_linear_x and check_linear_bias_out.
inline void check_float_linear(const TensorView& x, const TensorView& w, const TensorView& bias,
                               const TensorView& out, const char* op) {
  check_linear_x(x, op);
  const int64_t in_features = x.shape[1];
  ENGINE_CHECK(is_float_weight(w.dtype) && w.ndim == 2 && w.shape[1] == in_features, op,
               "w must be float32 or float16 or bfloat16 [out_features, " +
                   std::to_string(in_features) + "], got " + w.describe());
  if (w.numel() > 0) check_contiguous(w, op, "w");  // is_contiguous() rejects some empty views
  check_linear_bias_out(x, w, bias, out, w.shape[0], op);
}

// q or k of rope (CPU and CUDA): float32 [num_tokens, num_heads * head_dim] or [num_tokens,
// num_heads, head_dim]; the token stride (and head stride) are free, the last dim contiguous.
struct RopeHeads {
  int64_t num_heads = 0, token_stride = 0, head_stride = 0;
};

inline RopeHeads check_rope_heads(const TensorView& t, const char* arg, int64_t num_tokens,
                                  int64_t head_dim, const char* op = "rope") {
  check_dtype(t, op, arg, {DType::f32});
  ENGINE_CHECK(t.ndim == 2 || t.ndim == 3, op,
               std::string(arg) + " must have 2 dims [num_tokens, num_heads * head_dim], got " +
                   t.describe());
  ENGINE_CHECK(t.size(0) == num_tokens, op,
               std::string(arg) + " must have " + std::to_string(num_tokens) +
                   " rows (one per position), got " + t.describe());
  check_nonempty_row_contiguous(t, op, arg);
  RopeHeads h;
  h.token_stride = t.stride(0);
  if (t.ndim == 2) {
    ENGINE_CHECK(t.size(1) % head_dim == 0, op,
                 std::string(arg) + " must have a multiple of head_dim " +
                     std::to_string(head_dim) + " columns, got " + t.describe());
    h.num_heads = t.size(1) / head_dim;
    h.head_stride = head_dim;
  } else {
    ENGINE_CHECK(t.size(2) == head_dim, op,
                 std::string(arg) + " must have shape [*, *, " + std::to_string(head_dim) +
                     "], got " + t.describe());
    h.num_heads = t.size(1);
    h.head_stride = t.stride(1);
  }
  return h;
}

}  // namespace engine
