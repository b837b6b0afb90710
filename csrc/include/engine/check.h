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

}  // namespace engine
