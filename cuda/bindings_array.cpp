// pybind11 for DeviceArray: numpy-like views, host copies, DLPack, graphs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bindings_common.h"
#include "cuda_ops.h"
#include "device.h"
#include "dlpack.h"

namespace py = pybind11;
using engine::DType;
using engine_cuda::DeviceArray;

namespace {

// ============================================================================
// dtypes
// ============================================================================

DLDataType dl_dtype(DType d) {
  switch (d) {
    case DType::f32: return {kDLFloat, 32, 1};
    case DType::f16: return {kDLFloat, 16, 1};
    case DType::bf16: return {kDLBfloat, 16, 1};
    case DType::i32: return {kDLInt, 32, 1};
    case DType::i64: return {kDLInt, 64, 1};
    case DType::u8: return {kDLUInt, 8, 1};
    case DType::u64: return {kDLUInt, 64, 1};
  }
  throw std::invalid_argument("dlpack: unknown dtype");
}

DType from_dl_dtype(DLDataType t) {
  if (t.lanes != 1) throw std::invalid_argument("from_dlpack: vector dtypes are not supported");
  if (t.code == kDLFloat && t.bits == 32) return DType::f32;
  if (t.code == kDLFloat && t.bits == 16) return DType::f16;
  if (t.code == kDLBfloat && t.bits == 16) return DType::bf16;
  if (t.code == kDLInt && t.bits == 32) return DType::i32;
  if (t.code == kDLInt && t.bits == 64) return DType::i64;
  if (t.code == kDLUInt && t.bits == 8) return DType::u8;
  if (t.code == kDLUInt && t.bits == 64) return DType::u64;
  throw std::invalid_argument("from_dlpack: unsupported dtype code " + std::to_string(t.code) +
                              " with " + std::to_string(t.bits) + " bits");
}

// ============================================================================
// indexing: ints, slices (positive steps), Ellipsis
// ============================================================================

DeviceArray getitem(const DeviceArray& a, py::object key) {
  py::tuple items = py::isinstance<py::tuple>(key) ? key.cast<py::tuple>() : py::make_tuple(key);
  const int64_t nd = static_cast<int64_t>(a.shape.size());
  int64_t num_indexing = 0;
  bool has_ellipsis = false;
  for (auto item : items) {
    if (item.is(py::ellipsis())) {
      if (has_ellipsis) throw py::index_error("an index can only have a single ellipsis");
      has_ellipsis = true;
    } else {
      ++num_indexing;
    }
  }
  if (num_indexing > nd)
    throw py::index_error("too many indices: the array has " + std::to_string(nd) + " dims");
  std::vector<int64_t> shape, strides;
  int64_t offset = 0, dim = 0;
  for (auto item : items) {
    if (item.is(py::ellipsis())) {
      for (int64_t k = 0; k < nd - num_indexing; ++k, ++dim) {
        shape.push_back(a.shape[dim]);
        strides.push_back(a.strides[dim]);
      }
    } else if (py::isinstance<py::slice>(item)) {
      size_t start, stop, step, length;
      if (!item.cast<py::slice>().compute(static_cast<size_t>(a.shape[dim]), &start, &stop, &step,
                                          &length))
        throw py::error_already_set();
      if (static_cast<py::ssize_t>(step) <= 0)
        throw py::index_error("DeviceArray: only positive slice steps are supported");
      offset += static_cast<int64_t>(start) * a.strides[dim];
      shape.push_back(static_cast<int64_t>(length));
      strides.push_back(a.strides[dim] * static_cast<int64_t>(step));
      ++dim;
    } else if (py::isinstance<py::int_>(item) || py::hasattr(item, "__index__")) {
      int64_t i = py::int_(item.attr("__index__")()).cast<int64_t>();
      if (i < 0) i += a.shape[dim];
      if (i < 0 || i >= a.shape[dim])
        throw py::index_error("index " + std::to_string(i) + " is out of bounds for axis " +
                              std::to_string(dim) + " with size " + std::to_string(a.shape[dim]));
      offset += i * a.strides[dim];
      ++dim;
    } else {
      throw py::type_error("DeviceArray indices must be ints, slices or ...; got " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    }
  }
  for (; dim < nd; ++dim) {
    shape.push_back(a.shape[dim]);
    strides.push_back(a.strides[dim]);
  }
  return a.make_view(a.data + offset * engine::dtype_size(a.dtype), shape, strides);
}

// ============================================================================
// host copies
// ============================================================================

py::array to_numpy(const DeviceArray& a) {
  py::array out(engine_cuda::numpy_dtype(a.dtype), a.shape);
  void* host = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    engine_cuda::copy_to_host(a, host);
  }
  return out;
}

void copy_from_numpy(const DeviceArray& a, py::array src) {
  const std::string want = engine::dtype_name(a.dtype);
  const std::string got = py::str(src.dtype().attr("name"));
  if (got != want)
    throw py::value_error("copy_from: src must be " + want + " like the array, got " + got);
  std::vector<int64_t> shape(src.shape(), src.shape() + src.ndim());
  if (shape != a.shape)
    throw py::value_error("copy_from: src must have the array's shape " +
                          engine_cuda::shape_str(a.shape) + ", got " + engine_cuda::shape_str(shape));
  py::array c = py::array::ensure(src, py::array::c_style);
  const void* host = c.data();
  py::gil_scoped_release nogil;
  engine_cuda::copy_to_device(a, host);
}

DeviceArray from_numpy(py::array src) {
  DType dt = engine_cuda::dtype_of(src, "to_device", "array");
  std::vector<int64_t> shape(src.shape(), src.shape() + src.ndim());
  DeviceArray a = DeviceArray::empty(shape, dt);
  copy_from_numpy(a, src);
  return a;
}

// ============================================================================
// DLPack
// ============================================================================

struct ExportCtx {
  DeviceArray array;  // keeps the memory alive while the consumer holds it
  std::vector<int64_t> shape, strides;
  DLManagedTensor managed;
};

void delete_export(DLManagedTensor* self) { delete static_cast<ExportCtx*>(self->manager_ctx); }

void capsule_destructor(PyObject* capsule) {
  // Only an unconsumed capsule still owns its tensor; a consumer renames it "used_dltensor".
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (m && m->deleter) m->deleter(m);
  }
}

py::capsule to_dlpack(const DeviceArray& a, py::object stream) {
  // The consumer reads on its own stream: finish our work on the array first.
  (void)stream;
  engine_cuda::synchronize();
  auto* ctx = new ExportCtx{a, a.shape, a.strides, {}};
  DLTensor& t = ctx->managed.dl_tensor;
  t.data = a.data;
  t.device = {kDLCUDA, a.device};
  t.ndim = static_cast<int32_t>(a.shape.size());
  t.dtype = dl_dtype(a.dtype);
  t.shape = ctx->shape.data();
  t.strides = ctx->strides.data();
  t.byte_offset = 0;
  ctx->managed.manager_ctx = ctx;
  ctx->managed.deleter = delete_export;
  return py::capsule(&ctx->managed, "dltensor", capsule_destructor);
}

DeviceArray from_dlpack(py::object obj) {
  py::tuple dev = obj.attr("__dlpack_device__")();
  if (dev[0].cast<int>() != kDLCUDA)
    throw py::value_error("from_dlpack: the tensor must be on a CUDA device, got device type " +
                          std::to_string(dev[0].cast<int>()));
  // Ask the producer to order its pending work before our stream's.
  py::object cap = obj.attr("__dlpack__")(
      py::arg("stream") = reinterpret_cast<uintptr_t>(engine_cuda::engine_stream()));
  PyObject* c = cap.ptr();
  if (!PyCapsule_IsValid(c, "dltensor"))
    throw py::value_error("from_dlpack: expected an unused 'dltensor' capsule");
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
  PyCapsule_SetName(c, "used_dltensor");
  std::shared_ptr<void> owner(m, [](void* p) {
    auto* mt = static_cast<DLManagedTensor*>(p);
    if (mt->deleter) mt->deleter(mt);
  });
  const DLTensor& t = m->dl_tensor;
  DeviceArray a;
  a.owner = owner;
  a.dtype = from_dl_dtype(t.dtype);
  a.device = t.device.device_id;
  a.shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides) {
    a.strides.assign(t.strides, t.strides + t.ndim);
  } else {
    a.strides.assign(t.ndim, 1);
    for (int i = t.ndim - 2; i >= 0; --i) a.strides[i] = a.strides[i + 1] * a.shape[i + 1];
  }
  a.data = static_cast<char*>(t.data) + t.byte_offset;
  // The producer vouches for exactly the elements the view covers.
  int64_t lo = 0, hi = 0, n = 1;
  for (int i = 0; i < t.ndim; ++i) {
    n *= a.shape[i];
    int64_t span = (a.shape[i] - 1) * a.strides[i];
    if (a.shape[i] > 0) (span < 0 ? lo : hi) += span;
  }
  const int64_t item = engine::dtype_size(a.dtype);
  a.base = a.data + lo * item;
  a.capacity = n == 0 ? 0 : (hi - lo + 1) * item;
  return a;
}

}  // namespace

namespace engine_cuda {

void bind_device_array(py::module_& m) {
  py::class_<DeviceArray>(m, "DeviceArray", "An n-d array in GPU memory owned by engine.")
      .def_property_readonly("shape", [](const DeviceArray& a) {
        return py::tuple(py::cast(a.shape)); })
      .def_property_readonly("dtype", [](const DeviceArray& a) { return numpy_dtype(a.dtype); })
      .def_property_readonly("ndim", [](const DeviceArray& a) { return a.shape.size(); })
      .def_property_readonly("size", &DeviceArray::numel)
      .def_property_readonly("nbytes", &DeviceArray::nbytes)
      .def_property_readonly("strides", [](const DeviceArray& a) {  // in bytes, as numpy
        std::vector<int64_t> s;
        for (int64_t x : a.strides) s.push_back(x * engine::dtype_size(a.dtype));
        return py::tuple(py::cast(s)); })
      .def_property_readonly("data_ptr", [](const DeviceArray& a) {
        return reinterpret_cast<uintptr_t>(a.data); })
      .def_property_readonly("device", [](const DeviceArray& a) {
        return "cuda:" + std::to_string(a.device); })
      .def_property_readonly("is_contiguous", &DeviceArray::is_contiguous)
      .def("__len__", [](const DeviceArray& a) {
        if (a.shape.empty()) throw py::type_error("len() of a 0-d array");
        return a.shape[0]; })
      .def("__getitem__", &getitem)
      .def("reshape", [](const DeviceArray& a, py::args args) {
        std::vector<int64_t> shape;
        if (args.size() == 1 && py::isinstance<py::sequence>(args[0]))
          shape = args[0].cast<std::vector<int64_t>>();
        else
          shape = args.cast<std::vector<int64_t>>();
        return a.reshape(shape); })
      .def("numpy", &to_numpy, "A host copy as a numpy array (waits for the device).")
      .def("copy_from", &copy_from_numpy, py::arg("src"),
           "Copy a numpy array of the same shape and dtype into this array.")
      .def("__dlpack__", [](const DeviceArray& a, py::object stream, py::object max_version,
                            py::object dl_device, py::object copy) {
        return to_dlpack(a, stream); },
           py::arg("stream") = py::none(), py::arg("max_version") = py::none(),
           py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__", [](const DeviceArray& a) {
        return py::make_tuple(static_cast<int>(kDLCUDA), a.device); })
      .def("__repr__", [](const DeviceArray& a) {
        return "DeviceArray(shape=" + shape_str(a.shape) + ", dtype=" +
               engine::dtype_name(a.dtype) + ", device=cuda:" + std::to_string(a.device) + ")"; });

  m.def("empty", [](std::vector<int64_t> shape, py::object dtype) {
    return DeviceArray::empty(shape, dtype_from_py(dtype)); },
        py::arg("shape"), py::arg("dtype"), "An uninitialised device array.");
  m.def("zeros", [](std::vector<int64_t> shape, py::object dtype) {
    DeviceArray a = DeviceArray::empty(shape, dtype_from_py(dtype));
    if (a.nbytes() > 0)
      check_cuda(cudaMemsetAsync(a.data, 0, static_cast<size_t>(a.nbytes()), engine_stream()),
                 "zeros", "cudaMemsetAsync");
    return a; }, py::arg("shape"), py::arg("dtype"), "A zero-filled device array.");
  m.def("from_numpy", &from_numpy, py::arg("array"), "Copy a numpy array to the GPU.");
  m.def("from_dlpack", &from_dlpack, py::arg("tensor"),
        "A view of another library's CUDA tensor (torch, CuPy) through DLPack; no copy.");
  m.def("synchronize", []() { py::gil_scoped_release nogil; synchronize(); },
        "Wait for all work queued on engine's stream.");
  m.def("mem_get_info", []() {
    engine_stream();
    size_t free_b = 0, total_b = 0;
    check_cuda(cudaMemGetInfo(&free_b, &total_b), "mem_get_info", "cudaMemGetInfo");
    return py::make_tuple(free_b, total_b); }, "(free bytes, total bytes) of the device.");
  m.def("programmatic_launch", []() { engine_stream(); return programmatic_launch(); },
        "Whether kernels launch with programmatic dependent launch (sm_90+, unless "
        "ENGINE_CUDA_PDL=0 or set_programmatic_launch(False)).");
  m.def("set_programmatic_launch", [](bool on) { engine_stream(); set_programmatic_launch(on); },
        "Turn programmatic dependent launch on (where the device has it) or off for launches "
        "and graph captures from now on.");
  m.def("device_name", []() {
    cudaDeviceProp p{};
    engine_stream();
    check_cuda(cudaGetDeviceProperties(&p, 0), "device_name", "cudaGetDeviceProperties");
    return std::string(p.name); });

  py::class_<Graph>(m, "Graph", "Launches captured on engine's stream, replayed as one.")
      .def(py::init<>())
      .def("capture_begin", &Graph::capture_begin)
      .def("capture_end", &Graph::capture_end)
      .def("replay", [](Graph& g) { py::gil_scoped_release nogil; g.replay(); });
}

}  // namespace engine_cuda
