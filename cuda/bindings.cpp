// pybind11 bindings for engine._C_cuda: same Python names as engine._C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda_ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "engine's CUDA kernels";
  m.def("device_count", &engine_cuda::device_count,
        "Number of CUDA devices visible (0 without a driver or a GPU).");
  m.def(
      "silu_and_mul",
      [](py::array_t<float, py::array::c_style> x, py::array_t<float, py::array::c_style> out) {
        if (x.ndim() != 2 || x.shape(1) % 2 != 0)
          throw std::invalid_argument("silu_and_mul: x must be float32 [num_tokens, 2 * d]");
        if (out.ndim() != 2 || out.shape(0) != x.shape(0) || out.shape(1) * 2 != x.shape(1))
          throw std::invalid_argument("silu_and_mul: out must be float32 [num_tokens, d]");
        if (engine_cuda::device_count() == 0)
          throw std::runtime_error("silu_and_mul: no CUDA device is available");
        const float* xp = x.data();
        float* op = out.mutable_data();
        py::gil_scoped_release nogil;
        engine_cuda::silu_and_mul_host(xp, op, x.shape(0), x.shape(1) / 2);
      },
      py::arg("x").noconvert(), py::arg("out").noconvert(),
      "silu_and_mul on host float32 arrays, computed on the GPU (copies in and out).");
}
