// matmul on tensor cores for f16/bf16 weights, many tokens:
// mma.sync.m16n8k16 with f32 accumulators; x is rounded to w's dtype while it is staged
// into shared memory, so out = round(x) @ w^T (+ bias) summed in f32. Used above
// kSkinnyMaxTokens (and for all num_tokens > kGemvMaxTokens with ENGINE_CUDA_MATMUL_SKINNY=0).
//
// CTA tile BM x BN x 32 of K, 256 threads = 8 warps as 2 (M) x 4 (N), each warp
// (BM / 2) x (BN / 4): 64 x 128 up to 64 tokens, 128 x 256 when those tiles still make
// a wave (>= 132 CTAs), else 128 x 128. w tiles arrive by cp.async (16 bytes, zero-filled
// past N/K) in a kStages-deep ring; x tiles go global -> registers (f32) -> converted ->
// shared memory, loaded one tile ahead so the loads overlap the math. Shared rows are
// padded by 16 bytes (80-byte rows) so ldmatrix is conflict-free. CTAs are ordered in
// groups of 8 M-tiles so a group's x and the w tiles it walks stay in L2. When the tile
// grid is too small to fill the GPU, K is split over gridDim.z: each slice writes its
// partial tile to the scratch and launch_split_reduce adds the slices in a fixed order
// (deterministic).
//
// Needs: in_features % 8 == 0 (< 2^30), x rows and w 16-byte aligned (x_stride % 4 == 0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "cuda_ops.h"
#include "matmul.cuh"
#include "matmul_ptx.cuh"

namespace engine_cuda {
namespace matmul_detail {
namespace {

constexpr int kThreads = 256;
constexpr int kBK = 32;
constexpr int kLd = kBK + 8;  // shared row length in 16-bit elements (80 bytes)
constexpr int kStages = 4;
constexpr int kGroupM = 8;          // M-tiles per rasterisation group
constexpr int kNumSms = 132;        // H100 SXM; only tunes the split below
constexpr int kTargetCtas = 2 * kNumSms;  // split K until 2 CTAs per SM (both fit)
constexpr int kMinTilesPerSplit = 4;
constexpr int kMaxSplits = 16;
constexpr bool kUseWideTile = true;  // 128 x 256 tiles for many tokens (false: 128 x 128)

// ---- kernel --------------------------------------------------------------------------

// The CTA tile is BM x BN with BN = 4 * WN: warps 2 (M) x 4 (N), each (BM / 2) x WN.
// WN = 32 keeps 2 CTAs per SM (<= 128 registers); WN = 64 (128 x 256, for many tokens)
// halves the x traffic per FLOP and runs 1 CTA per SM.
template <int WN>
constexpr int min_ctas_per_sm() { return WN == 32 ? 2 : 1; }

template <typename W, int BM, int WN>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm<WN>())
mma_kernel(const float* __restrict__ x,     // [M, K], row stride x_stride
           int64_t x_stride,
           const W* __restrict__ w,         // [N, K] contiguous
           const float* __restrict__ bias,  // [N] or nullptr
           float* __restrict__ out,         // [M, N], row stride out_stride
           int64_t out_stride,
           float* __restrict__ partial,     // [gridDim.z, M, N] when gridDim.z > 1, else unused
           int64_t M, int64_t N, int64_t K, int tiles_per_split) {
  pdl_begin();
  constexpr int kWarpM = BM / 2;
  constexpr int kMT = kWarpM / 16;          // m16 tiles per warp
  constexpr int kBN = 4 * WN;
  constexpr int kNT = WN / 8;               // n8 tiles per warp
  constexpr int kAVecs = BM * kBK / 4 / kThreads;  // float4 of x per thread per tile
  constexpr int kBVecs = kBN * kBK / 8 / kThreads; // 16-byte chunks of w per thread per tile
  static_assert(kAVecs * kThreads * 4 == BM * kBK && kBVecs * kThreads * 8 == kBN * kBK);

  extern __shared__ __align__(16) unsigned char smem[];
  W* s_a = reinterpret_cast<W*>(smem);  // [kStages][BM][kLd]
  W* s_b = s_a + kStages * BM * kLd;    // [kStages][kBN][kLd]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 4, warp_n = warp % 4;

  // Grouped rasterisation: blockIdx.x -> (m_tile, n_tile).
  const int64_t n_tiles = (N + kBN - 1) / kBN, m_tiles = (M + BM - 1) / BM;
  const int64_t block = blockIdx.x;
  const int64_t first_m = block / (kGroupM * n_tiles) * kGroupM;
  const int64_t group_size = min(m_tiles - first_m, static_cast<int64_t>(kGroupM));
  const int64_t in_group = block % (kGroupM * n_tiles);
  const int64_t m0 = (first_m + in_group % group_size) * BM;
  const int64_t n0 = (in_group / group_size) * kBN;

  // Tile-relative bounds in 32 bits (K, and rows left in a tile, fit in an int).
  const float* x_blk = x + m0 * x_stride;  // row m0
  const W* w_blk = w + n0 * K;             // row n0
  const int m_left = static_cast<int>(min(M - m0, static_cast<int64_t>(BM)));
  const int n_left = static_cast<int>(min(N - n0, static_cast<int64_t>(kBN)));
  const int k_len = static_cast<int>(K);
  const int k_tiles = (k_len + kBK - 1) / kBK;
  const int kt_begin = blockIdx.z * tiles_per_split;
  const int num_tiles = min(k_tiles, kt_begin + tiles_per_split) - kt_begin;

  // w tile (kt) -> stage, asynchronously.
  auto load_b = [&](int stage, int kt) {
#pragma unroll
    for (int i = 0; i < kBVecs; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 8), col = c % (kBK / 8) * 8;
      const int k = kt * kBK + col;
      const bool ok = row < n_left && k < k_len;  // K % 8 == 0: a chunk is all in or all out
      cp_async16(s_b + (stage * kBN + row) * kLd + col, ok ? w_blk + row * K + k : w,
                 ok ? 16 : 0);
    }
  };
  // x tile (kt) -> registers (f32), then -> stage (rounded to W).
  float4 x_regs[kAVecs];
  auto load_a = [&](int kt) {
#pragma unroll
    for (int i = 0; i < kAVecs; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 4), col = c % (kBK / 4) * 4;
      const int k = kt * kBK + col;
      x_regs[i] = row < m_left && k < k_len
                      ? __ldg(reinterpret_cast<const float4*>(x_blk + row * x_stride + k))
                      : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  };
  auto store_a = [&](int stage) {
#pragma unroll
    for (int i = 0; i < kAVecs; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 4), col = c % (kBK / 4) * 4;
      const uint2 v = make_uint2(pack2<W>(x_regs[i].x, x_regs[i].y),
                                 pack2<W>(x_regs[i].z, x_regs[i].w));
      *reinterpret_cast<uint2*>(s_a + (stage * BM + row) * kLd + col) = v;
    }
  };

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // ---- pipeline: prologue fills kStages - 1 stages; one commit group per tile ----------
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) {
      load_b(s, kt_begin + s);
      load_a(kt_begin + s);
      store_a(s);
    }
    cp_async_commit();
  }

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<kStages - 2>();  // tile t's w has landed (for this thread) ...
    __syncthreads();               // ... for all threads; stage (t - 1) is free again
    const int next = t + kStages - 1;
    const bool has_next = next < num_tiles;
    if (has_next) {
      load_b(next % kStages, kt_begin + next);
      load_a(kt_begin + next);
    }
    cp_async_commit();

    const W* a_tile = s_a + (t % kStages) * BM * kLd;
    const W* b_tile = s_b + (t % kStages) * kBN * kLd;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a_frag[kMT][4], b_frag[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const int row = warp_m * kWarpM + i * 16 + lane % 16;
        ldmatrix_x4(a_frag[i], a_tile + row * kLd + kk + lane / 16 * 8);
      }
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        const int row = warp_n * WN + j * 8 + lane / 16 * 8 + lane % 8;
        uint32_t r[4];
        ldmatrix_x4(r, b_tile + row * kLd + kk + lane / 8 % 2 * 8);
        b_frag[j][0] = r[0];
        b_frag[j][1] = r[1];
        b_frag[j + 1][0] = r[2];
        b_frag[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma16816<W>(acc[i][j], a_frag[i], b_frag[j]);
    }
    // Stage next % kStages == (t - 1) % kStages: every thread finished reading it
    // before the barrier above; it is read again after the barrier of iteration `next`.
    if (has_next) store_a(next % kStages);
  }
  cp_async_wait<0>();

  // ---- epilogue: c0, c1 at (row g, cols 2q, 2q+1); c2, c3 at row g + 8 ----------------
  // A K slice (gridDim.z > 1) stores its plain partial sums; the reduce adds the bias.
  float* slice = gridDim.z > 1 ? partial + static_cast<int64_t>(blockIdx.z) * M * N : nullptr;
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + warp_m * kWarpM + i * 16 + lane / 4 + e / 2 * 8;
        const int64_t n = n0 + warp_n * WN + j * 8 + lane % 4 * 2 + e % 2;
        if (m >= M || n >= N) continue;
        if (slice != nullptr)
          slice[m * N + n] = acc[i][j][e];
        else
          out[m * out_stride + n] = acc[i][j][e] + (bias != nullptr ? bias[n] : 0.0f);
      }
}

// ---- launch --------------------------------------------------------------------------

// The tile shape and K split for a problem size (shapes only).
struct MmaPlan {
  int bm, wn;               // tile BM x (4 * wn)
  int64_t ctas;             // M-tiles x N-tiles
  int64_t splits;           // K slices (grid.z); 1: no split
  int64_t tiles_per_split;  // k-tiles of kBK per slice (the last may have fewer)
};

MmaPlan plan_mma(int64_t M, int64_t N, int64_t K) {
  MmaPlan p;
  const int64_t wide_ctas = (M + 127) / 128 * ((N + 255) / 256);
  if (M <= 64)
    p.bm = 64, p.wn = 32;
  else if (kUseWideTile && wide_ctas >= kNumSms)  // 128 x 256 tiles still fill the GPU
    p.bm = 128, p.wn = 64;
  else
    p.bm = 128, p.wn = 32;
  const int64_t bn = 4 * p.wn;
  const int64_t k_tiles = (K + kBK - 1) / kBK;
  p.ctas = (M + p.bm - 1) / p.bm * ((N + bn - 1) / bn);
  int64_t splits = 1;
  if (p.ctas < kNumSms) {  // less than one wave: split K (a wave or more stays whole)
    splits = std::min<int64_t>({(kTargetCtas + p.ctas - 1) / p.ctas,
                                k_tiles / kMinTilesPerSplit, kMaxSplits});
    splits = std::max<int64_t>(splits, 1);
  }
  p.tiles_per_split = (k_tiles + splits - 1) / splits;
  p.splits = (k_tiles + p.tiles_per_split - 1) / p.tiles_per_split;  // no empty slice
  return p;
}

template <typename W, int BM, int WN>
void launch_mma_for(const MatmulArgs& a, const MmaPlan& p, float* partial,
                    cudaStream_t stream) {
  constexpr int kBN = 4 * WN;
  constexpr int kSmemBytes = kStages * (BM + kBN) * kLd * static_cast<int>(sizeof(W));
  static const bool configured = [] {  // once per instantiation (not a stream operation)
    check_cuda(cudaFuncSetAttribute(mma_kernel<W, BM, WN>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
               "matmul", "cudaFuncSetAttribute");
    return true;
  }();
  (void)configured;

  const dim3 grid(static_cast<unsigned>(p.ctas), 1, static_cast<unsigned>(p.splits));
  launch_kernel(mma_kernel<W, BM, WN>, grid, kThreads, kSmemBytes, stream, a.x, a.x_stride,
                static_cast<const W*>(a.w), a.bias, a.out, a.out_stride, partial, a.num_tokens,
                a.out_features, a.in_features, static_cast<int>(p.tiles_per_split));
}

template <typename W>
void launch_mma_typed(const MatmulArgs& a, const MmaPlan& p, float* partial,
                      cudaStream_t stream) {
  if (p.bm == 64)
    launch_mma_for<W, 64, 32>(a, p, partial, stream);
  else if (p.wn == 64)
    launch_mma_for<W, 128, 64>(a, p, partial, stream);
  else
    launch_mma_for<W, 128, 32>(a, p, partial, stream);
}

}  // namespace

int64_t mma_scratch_bytes(int64_t num_tokens, int64_t out_features, int64_t in_features) {
  const MmaPlan p = plan_mma(num_tokens, out_features, in_features);
  return p.splits > 1 ? p.splits * num_tokens * out_features * static_cast<int64_t>(sizeof(float))
                      : 0;
}

void launch_mma(const MatmulArgs& a, void* scratch, cudaStream_t stream) {
  const MmaPlan p = plan_mma(a.num_tokens, a.out_features, a.in_features);
  float* partial = p.splits > 1 ? static_cast<float*>(scratch) : nullptr;
  if (a.w_dtype == engine::DType::bf16)
    launch_mma_typed<__nv_bfloat16>(a, p, partial, stream);
  else
    launch_mma_typed<__half>(a, p, partial, stream);
  if (p.splits > 1) launch_split_reduce(a, partial, p.splits, stream);
}

}  // namespace matmul_detail
}  // namespace engine_cuda
