// Device-wide pieces every op uses: error checks, the engine's stream, capture state.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "cuda_ops.h"
#include "device.h"

namespace engine_cuda {

void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": " + what + ": " + cudaGetErrorString(err));
}

void check_launch(const char* op) { check_cuda(cudaGetLastError(), op, "kernel launch"); }

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &status), "is_capturing", "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the error: no driver or no device means zero
    return 0;
  }
  return n;
}

cudaStream_t engine_stream() {
  // Non-blocking: it never waits on the legacy default stream, and it can be captured.
  static cudaStream_t stream = [] {
    if (device_count() == 0) throw std::runtime_error("engine: no CUDA device is available");
    cudaStream_t s = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "engine", "cudaStreamCreate");
    return s;
  }();
  return stream;
}

namespace {
std::atomic<int> pdl_state{-1};  // -1: not yet decided, else 0 or 1

bool device_supports_pdl() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major >= 9;
}
}  // namespace

bool programmatic_launch() {
  if (pdl_state < 0) {
    const char* env = std::getenv("ENGINE_CUDA_PDL");
    pdl_state = !(env != nullptr && std::strcmp(env, "0") == 0) && device_supports_pdl();
  }
  return pdl_state == 1;
}

void set_programmatic_launch(bool on) { pdl_state = on && device_supports_pdl(); }

void synchronize() {
  check_cuda(cudaStreamSynchronize(engine_stream()), "synchronize", "cudaStreamSynchronize");
}

}  // namespace engine_cuda
