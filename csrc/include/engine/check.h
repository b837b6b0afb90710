// Argument checks at the op boundary. Each failure throws std::invalid_argument
// naming the op, the argument, what was expected and what came; pybind11 turns
// it into ValueError.
#pragma once

#include <initializer_list>
#include <stdexcept>
#include <string>

#include "engine/tensor.h"

namespace engine {

[[noreturn]] inline void fail(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

inline void check(bool ok, const char* op, const std::string& msg) {
  if (!ok) fail(op, msg);
}

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

inline void check_ndim(const TensorView& t, const char* op, const char* arg, int ndim) {
  check(t.ndim == ndim, op,
        std::string(arg) + " must have " + std::to_string(ndim) + " dims, got " + t.describe());
}

// shape entries of -1 match anything.
inline void check_shape(const TensorView& t, const char* op, const char* arg,
                        std::initializer_list<int64_t> shape) {
  bool ok = t.ndim == static_cast<int>(shape.size());
  int i = 0;
  std::string want = "[";
  for (int64_t s : shape) {
    if (i) want += ", ";
    want += s < 0 ? std::string("*") : std::to_string(s);
    if (ok && s >= 0 && t.shape[i] != s) ok = false;
    ++i;
  }
  want += "]";
  check(ok, op, std::string(arg) + " must have shape " + want + ", got " + t.describe());
}

inline void check_contiguous(const TensorView& t, const char* op, const char* arg) {
  check(t.is_contiguous(), op, std::string(arg) + " must be contiguous, got strides that are not");
}

inline void check_row_contiguous(const TensorView& t, const char* op, const char* arg) {
  check(t.is_row_contiguous(), op,
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
