// Conversions shared by the _C_cuda binding files: numpy dtypes <-> DType, shapes.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/tensor.h"

namespace engine_cuda {

namespace py = pybind11;

inline engine::DType dtype_of_numpy(const py::dtype& dt, const char* op, const char* arg) {
  using engine::DType;
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'f' && size == 4) return DType::f32;
  if (kind == 'f' && size == 2) return DType::f16;
  if (kind == 'i' && size == 4) return DType::i32;
  if (kind == 'i' && size == 8) return DType::i64;
  if (kind == 'u' && size == 1) return DType::u8;
  if (kind == 'u' && size == 8) return DType::u64;
  const std::string name = py::str(dt.attr("name"));
  if (name == "bfloat16") return DType::bf16;
  engine::fail(op, std::string(arg) + " has unsupported dtype " + name);
}

inline engine::DType dtype_of(const py::array& a, const char* op, const char* arg) {
  return dtype_of_numpy(a.dtype(), op, arg);
}

inline engine::DType dtype_from_py(py::object dtype) {
  py::object np_dtype = py::module_::import("numpy").attr("dtype")(dtype);
  return dtype_of_numpy(np_dtype.cast<py::dtype>(), "empty", "dtype");
}

inline py::dtype numpy_dtype(engine::DType d) {
  using engine::DType;
  switch (d) {
    case DType::f32: return py::dtype("float32");
    case DType::f16: return py::dtype("float16");
    case DType::i32: return py::dtype("int32");
    case DType::i64: return py::dtype("int64");
    case DType::u8: return py::dtype("uint8");
    case DType::u64: return py::dtype("uint64");
    case DType::bf16: break;
  }
  return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace engine_cuda
