// The kernel ABI: a non-owning view of an n-d array (pointer, dtype, shape,
// strides in elements). Bindings build views from numpy arrays without
// copying; kernels read raw pointers and strides from them.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace engine {

enum class DType : int32_t { f32, f16, bf16, i32, i64, u8, u64 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
    case DType::u64: return "uint64";
  }
  return "unknown";
}

inline int64_t dtype_size(DType d) {
  switch (d) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::i64: case DType::u64: return 8;
    case DType::u8: return 1;
  }
  return 0;
}

constexpr int kMaxDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};  // in elements, not bytes

  int64_t size(int dim) const { return shape[dim < 0 ? dim + ndim : dim]; }
  int64_t stride(int dim) const { return strides[dim < 0 ? dim + ndim : dim]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    if (numel() == 0) return true;  // numpy gives empty arrays arbitrary strides
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  // Rows are contiguous along the last dim (inner stride 1); outer strides free.
  bool is_row_contiguous() const {
    return ndim == 0 || numel() == 0 || shape[ndim - 1] <= 1 || strides[ndim - 1] == 1;
  }
  template <typename T> T* ptr() const { return static_cast<T*>(data); }
  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) {
      if (i) s += ", ";
      s += std::to_string(shape[i]);
    }
    return s + "]";
  }
  std::string describe() const { return std::string(dtype_name(dtype)) + " " + shape_str(); }
};

// An optional tensor argument (bias, ...): data == nullptr means absent.
inline bool present(const TensorView& t) { return t.data != nullptr; }

}  // namespace engine
