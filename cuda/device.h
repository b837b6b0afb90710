// Device memory owned by engine: DeviceArray (an n-d view into a refcounted
// allocation), the engine's stream, and CUDA graphs. No framework is involved;
// DLPack moves arrays to and from torch or CuPy without copies.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/tensor.h"

namespace engine_cuda {

// The one stream every op, copy and graph of engine runs on (created on first use).
cudaStream_t engine_stream();
// Waits until everything queued on the engine's stream has finished.
void synchronize();

// Whether kernels launch with programmatic stream serialisation (common.cuh's launch_kernel()):
// the device is sm_90 or later and ENGINE_CUDA_PDL is not "0". set_programmatic_launch
// turns it off, or back on where the device has it, for launches and captures after it.
bool programmatic_launch();
void set_programmatic_launch(bool on);

// An n-d strided view of device memory. `owner` keeps the memory alive (a cudaMalloc
// allocation, or a DLPack producer's tensor); views share it. [base, base + capacity)
// is the memory the owner guarantees: every view is checked to stay inside it.
struct DeviceArray {
  std::shared_ptr<void> owner;
  char* base = nullptr;       // start of the owner's memory
  int64_t capacity = 0;       // bytes from base
  char* data = nullptr;       // first element of this view
  engine::DType dtype = engine::DType::f32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  int device = 0;

  int64_t numel() const;
  int64_t nbytes() const { return numel() * engine::dtype_size(dtype); }
  bool is_contiguous() const;
  engine::TensorView view() const;  // for the launchers (at most kMaxDims dims)

  // A fresh contiguous allocation.
  static DeviceArray empty(const std::vector<int64_t>& shape, engine::DType dtype);
  // A view sharing this array's memory; throws std::out_of_range if it would reach outside.
  DeviceArray make_view(char* data, std::vector<int64_t> shape,
                        std::vector<int64_t> strides) const;
  // numpy-style reshape without a copy; throws std::invalid_argument if one is needed.
  DeviceArray reshape(std::vector<int64_t> shape) const;
};

// Host <-> device copies, ordered on the engine's stream. The host side is a contiguous
// buffer of nbytes(); the device side is contiguous or a set of equally spaced rows
// (the last dim contiguous, the leading dims collapsing to one stride).
void copy_to_device(const DeviceArray& dst, const void* host);
void copy_to_host(const DeviceArray& src, void* host);  // waits for the copy

// A captured sequence of launches on the engine's stream, replayed as one.
class Graph {
 public:
  Graph() = default;
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void capture_begin();
  void capture_end();
  void replay();

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace engine_cuda
