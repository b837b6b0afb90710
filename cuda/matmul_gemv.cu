// matmul for a few tokens (num_tokens <= kGemvMaxTokens) and f16/bf16 weights: bound by
// reading w, so each weight byte is read exactly once, in 16-byte coalesced loads, for all
// tokens at once; the math is f32 (x is not rounded).
//
// Block: 256 threads (8 warps) own kRows consecutive weight rows and split K between
// them: thread t reads 16-byte vectors t, t + 256, ... of each row (a warp reads 512
// contiguous bytes per row per step). Partial sums are reduced with warp shuffles, then
// across the 8 warps through shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"
#include "matmul.cuh"

namespace engine_cuda {
namespace matmul_detail {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;    // weight rows per block
constexpr int kUnroll = 2;  // vectors per row per thread per step (loads in flight: kRows * kUnroll)

// A 16-byte load that bypasses L1 (w is streamed once; L1 keeps x).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Two 16-bit values packed in a word (the lower address in the low half) -> f32.
__device__ __forceinline__ float2 unpack2(uint32_t u, __nv_bfloat16) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(uint32_t u, __half) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  return __half22float2(h);
}

template <typename W>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 p = unpack2(words[i], W());
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

template <typename W, int M>
__global__ void __launch_bounds__(kThreads)
gemv_kernel(const float* __restrict__ x,     // [M, K], row stride x_stride (multiple of 4)
            int64_t x_stride,
            const uint4* __restrict__ w,     // [N, K / 8]: rows of 8 16-bit values
            const float* __restrict__ bias,  // [N] or nullptr
            float* __restrict__ out,         // [M, N], row stride out_stride
            int64_t out_stride, int64_t n_rows, int64_t num_vec) {
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const uint4* w_row[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    // Rows past the end re-read the last row (valid memory) and are never stored.
    const int64_t row = row0 + r < n_rows ? row0 + r : n_rows - 1;
    w_row[r] = w + row * num_vec;
  }
  // The weights are no kernel's output: start fetching this thread's share into L2 before
  // waiting for the kernel before (which writes x), so the fetch overlaps its tail.
  for (int64_t v = threadIdx.x; v < num_vec; v += kThreads)
#pragma unroll
    for (int r = 0; r < kRows; ++r) prefetch_l2(w_row[r] + v);
  pdl_begin();

  float acc[M][kRows];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[m][r] = 0.0f;

  for (int64_t v0 = threadIdx.x; v0 < num_vec; v0 += kThreads * kUnroll) {
    uint4 wv[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * kThreads;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        wv[u][r] = v < num_vec ? load_stream(w_row[r] + v) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (v >= num_vec) break;
      float wf[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) unpack8<W>(wv[u][r], wf[r]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4* xp = reinterpret_cast<const float4*>(x + m * x_stride) + 2 * v;
        const float4 xa = __ldg(xp), xb = __ldg(xp + 1);
        const float xf[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m][r] = fmaf(wf[r][i], xf[i], acc[m][r]);
      }
    }
  }

  // ---- reduce: within each warp, then across the warps -----------------------------
  __shared__ float partial[kWarps][M * kRows];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float s = acc[m][r];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (lane == 0) partial[warp][m * kRows + r] = s;
    }
  __syncthreads();
  if (threadIdx.x < M * kRows) {
    const int m = threadIdx.x / kRows, r = threadIdx.x % kRows;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) s += partial[i][threadIdx.x];
    const int64_t n = row0 + r;
    if (n < n_rows) out[m * out_stride + n] = s + (bias != nullptr ? bias[n] : 0.0f);
  }
}

template <typename W, int M>
void launch_gemv_for(const MatmulArgs& a, cudaStream_t stream) {
  const int64_t num_blocks = (a.out_features + kRows - 1) / kRows;
  launch_kernel(gemv_kernel<W, M>, static_cast<unsigned>(num_blocks), kThreads, 0, stream, a.x,
                a.x_stride, static_cast<const uint4*>(a.w), a.bias, a.out, a.out_stride,
                a.out_features, a.in_features / 8);
}

template <typename W>
void launch_gemv_typed(const MatmulArgs& a, cudaStream_t stream) {
  switch (a.num_tokens) {
    case 1: return launch_gemv_for<W, 1>(a, stream);
    case 2: return launch_gemv_for<W, 2>(a, stream);
    case 3: return launch_gemv_for<W, 3>(a, stream);
    case 4: return launch_gemv_for<W, 4>(a, stream);
    case 5: return launch_gemv_for<W, 5>(a, stream);
    case 6: return launch_gemv_for<W, 6>(a, stream);
    case 7: return launch_gemv_for<W, 7>(a, stream);
    default: return launch_gemv_for<W, 8>(a, stream);
  }
}

}  // namespace

static_assert(kGemvMaxTokens == 8, "launch_gemv_typed instantiates 1..8 tokens");

void launch_gemv(const MatmulArgs& a, cudaStream_t stream) {
  if (a.w_dtype == engine::DType::bf16)
    launch_gemv_typed<__nv_bfloat16>(a, stream);
  else
    launch_gemv_typed<__half>(a, stream);
}

}  // namespace matmul_detail
}  // namespace engine_cuda
