// DeviceArray: allocation, views, reshape, host copies; Graph: capture and replay.
#include "device.h"

#include <stdexcept>
#include <string>

#include "cuda_ops.h"

namespace engine_cuda {

using engine::DType;

// ============================================================================
// DeviceArray
// ============================================================================

int64_t DeviceArray::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

bool DeviceArray::is_contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

engine::TensorView DeviceArray::view() const {
  if (shape.size() > static_cast<size_t>(engine::kMaxDims))
    throw std::invalid_argument("DeviceArray: ops take at most 4 dims, got " +
                                std::to_string(shape.size()));
  engine::TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = shape[i];
    t.strides[i] = strides[i];
  }
  return t;
}

static std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

DeviceArray DeviceArray::empty(const std::vector<int64_t>& shape, DType dtype) {
  int64_t n = 1;
  for (int64_t s : shape) {
    if (s < 0) throw std::invalid_argument("DeviceArray: negative dimension in shape");
    n *= s;
  }
  const int64_t bytes = n * engine::dtype_size(dtype);
  engine_stream();  // fails clearly when there is no device
  void* ptr = nullptr;
  if (bytes > 0) {
    cudaError_t err = cudaMalloc(&ptr, static_cast<size_t>(bytes));
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("DeviceArray: cannot allocate " + std::to_string(bytes) +
                               " bytes on the GPU: " + cudaGetErrorString(err));
    }
  }
  DeviceArray a;
  a.owner = std::shared_ptr<void>(ptr, [](void* p) { if (p) cudaFree(p); });
  a.base = a.data = static_cast<char*>(ptr);
  a.capacity = bytes;
  a.dtype = dtype;
  a.shape = shape;
  a.strides = contiguous_strides(shape);
  cudaGetDevice(&a.device);
  return a;
}

DeviceArray DeviceArray::make_view(char* new_data, std::vector<int64_t> new_shape,
                                   std::vector<int64_t> new_strides) const {
  // The lowest and highest byte any element of the view touches must be inside the owner.
  const int64_t item = engine::dtype_size(dtype);
  int64_t lo = 0, hi = 0, n = 1;
  for (size_t i = 0; i < new_shape.size(); ++i) {
    if (new_shape[i] < 0) throw std::invalid_argument("DeviceArray: negative dimension");
    n *= new_shape[i];
    const int64_t span = (new_shape[i] - 1) * new_strides[i] * item;
    if (new_shape[i] > 0) (span < 0 ? lo : hi) += span;
  }
  const int64_t offset = new_data - base;
  if (n > 0 && (offset + lo < 0 || offset + hi + item > capacity))
    throw std::out_of_range("DeviceArray: view reaches outside its allocation");
  DeviceArray v = *this;
  v.data = new_data;
  v.shape = std::move(new_shape);
  v.strides = std::move(new_strides);
  return v;
}

DeviceArray DeviceArray::reshape(std::vector<int64_t> new_shape) const {
  // Resolve one -1.
  int64_t known = 1, unknown = -1;
  for (size_t i = 0; i < new_shape.size(); ++i) {
    if (new_shape[i] == -1) {
      if (unknown >= 0) throw std::invalid_argument("reshape: only one dimension can be -1");
      unknown = static_cast<int64_t>(i);
    } else if (new_shape[i] < 0) {
      throw std::invalid_argument("reshape: negative dimension");
    } else {
      known *= new_shape[i];
    }
  }
  const int64_t n = numel();
  if (unknown >= 0) {
    if (known == 0 || n % known != 0)
      throw std::invalid_argument("reshape: cannot infer -1 for " + std::to_string(n) + " elements");
    new_shape[unknown] = n / known;
    known *= new_shape[unknown];
  }
  if (known != n)
    throw std::invalid_argument("reshape: cannot reshape " + std::to_string(n) +
                                " elements into " + std::to_string(known));
  if (is_contiguous()) return make_view(data, new_shape, contiguous_strides(new_shape));
  // numpy's no-copy rule: walk old and new dims in groups of equal element counts; each
  // old group must be contiguous within itself, and the new group takes its strides.
  std::vector<int64_t> old_shape, old_strides;
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] != 1) { old_shape.push_back(shape[i]); old_strides.push_back(strides[i]); }
  std::vector<int64_t> out_strides(new_shape.size(), 0);
  size_t oi = 0, ni = 0;
  while (oi < old_shape.size() && ni < new_shape.size()) {
    size_t oj = oi + 1, nj = ni + 1;
    int64_t op = old_shape[oi], np_ = new_shape[ni];
    while (op != np_) {
      if (np_ < op) np_ *= new_shape[nj++];
      else op *= old_shape[oj++];
    }
    for (size_t k = oi; k + 1 < oj; ++k)
      if (old_strides[k] != old_strides[k + 1] * old_shape[k + 1])
        throw std::invalid_argument("reshape: this view needs a copy to take the new shape");
    out_strides[nj - 1] = old_strides[oj - 1];
    for (size_t k = nj - 1; k > ni; --k) out_strides[k - 1] = out_strides[k] * new_shape[k];
    oi = oj;
    ni = nj;
  }
  for (size_t k = 0; k < new_shape.size(); ++k)
    if (new_shape[k] == 1 && out_strides[k] == 0) out_strides[k] = 1;
  return make_view(data, new_shape, out_strides);
}

// ============================================================================
// Host copies
// ============================================================================

namespace {

// rows x row_bytes with a device pitch, for contiguous or row-strided arrays.
struct Layout2d {
  int64_t rows, row_bytes, pitch;
};

Layout2d layout_2d(const DeviceArray& a, const char* op) {
  const int64_t item = engine::dtype_size(a.dtype);
  if (a.is_contiguous()) return {1, a.nbytes(), a.nbytes()};
  // The contiguous inner block: trailing dims whose strides follow row-major order.
  const int nd = static_cast<int>(a.shape.size());
  int64_t inner = 1;
  int i = nd - 1;
  for (; i >= 0 && (a.shape[i] == 1 || a.strides[i] == inner); --i) inner *= a.shape[i];
  // The outer dims must collapse into equally spaced rows of that block.
  int64_t rows = 1, pitch = 0, expected = 0;
  for (; i >= 0; --i) {
    if (a.shape[i] == 1) continue;
    if (pitch == 0) {
      pitch = a.strides[i];
    } else if (a.strides[i] != expected) {
      throw std::invalid_argument(std::string(op) +
                                  ": the array's rows are not equally spaced (copy it first)");
    }
    rows *= a.shape[i];
    expected = a.strides[i] * a.shape[i];
  }
  if (pitch == 0) pitch = inner;
  if (pitch < inner)
    throw std::invalid_argument(std::string(op) + ": the array's rows overlap");
  return {rows, inner * item, pitch * item};
}

}  // namespace

void copy_to_device(const DeviceArray& dst, const void* host) {
  if (dst.numel() == 0) return;
  Layout2d l = layout_2d(dst, "copy_to_device");
  check_cuda(cudaMemcpy2DAsync(dst.data, l.pitch, host, l.row_bytes, l.row_bytes, l.rows,
                               cudaMemcpyHostToDevice, engine_stream()),
             "copy_to_device", "cudaMemcpy2DAsync");
}

void copy_to_host(const DeviceArray& src, void* host) {
  if (src.numel() == 0) return;
  Layout2d l = layout_2d(src, "copy_to_host");
  check_cuda(cudaMemcpy2DAsync(host, l.row_bytes, src.data, l.pitch, l.row_bytes, l.rows,
                               cudaMemcpyDeviceToHost, engine_stream()),
             "copy_to_host", "cudaMemcpy2DAsync");
  synchronize();
}

// ============================================================================
// Graph
// ============================================================================

Graph::~Graph() {
  if (exec_) cudaGraphExecDestroy(exec_);
  if (graph_) cudaGraphDestroy(graph_);
}

void Graph::capture_begin() {
  if (graph_) throw std::runtime_error("Graph: already captured");
  // Relaxed: the capture only records this stream's work; other threads may keep
  // using the CUDA runtime meanwhile.
  check_cuda(cudaStreamBeginCapture(engine_stream(), cudaStreamCaptureModeRelaxed), "Graph",
             "cudaStreamBeginCapture");
}

void Graph::capture_end() {
  check_cuda(cudaStreamEndCapture(engine_stream(), &graph_), "Graph", "cudaStreamEndCapture");
  check_cuda(cudaGraphInstantiate(&exec_, graph_, 0), "Graph", "cudaGraphInstantiate");
}

void Graph::replay() {
  if (!exec_) throw std::runtime_error("Graph: nothing captured");
  check_cuda(cudaGraphLaunch(exec_, engine_stream()), "Graph", "cudaGraphLaunch");
}

}  // namespace engine_cuda
