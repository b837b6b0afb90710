// Declarations of the CUDA launchers (host functions). Names follow engine._C.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace engine_cuda {

int device_count();
// x [num_tokens, 2 * d] f32 and out [num_tokens, d] f32, both device pointers.
void silu_and_mul(const float* x, float* out, int64_t num_tokens, int64_t d, cudaStream_t stream);
// The same on host arrays: copies in, runs, copies out (tests and the smoke check).
void silu_and_mul_host(const float* x, float* out, int64_t num_tokens, int64_t d);

}  // namespace engine_cuda
