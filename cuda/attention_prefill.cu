// paged_attention, prefill and mixed batches: FlashAttention-style tiles on CUDA cores, f32.
//
// A CTA (128 threads, 4 warps) takes BM = 32 rows of one sequence and one KV head, a row
// being a (new token, query head of the KV head's group) pair: row r is token r / group,
// head r % group, so the group's heads share every K/V tile. grid.x is sized for the worst
// case, ceil(num_tokens * group / BM) + num_seqs tiles; each CTA finds its (sequence,
// tile) with a warp scan over query_start_loc and exits when past the real count.
// Keys go through shared memory in tiles of BN = 32 positions, up to the tile's causal
// limit. Each warp owns 8 rows: for S = Q K^T lane j holds key j of the tile; for O += P V
// lane i holds dims i, i + 32, ...; the online softmax (m per row, l per lane) is in the
// exp2 domain. head_dim is padded with zeros to DMAX (32, 64, 128 or 256).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention.cuh"
#include "common.cuh"
#include "cuda_ops.h"

namespace engine_cuda {
namespace attention {
namespace {

constexpr int kThreads = 128, kWarps = 4;
constexpr int BM = 32, BN = 32, RPW = BM / kWarps;  // rows per tile, keys per tile, rows per warp
constexpr unsigned kFull = 0xffffffffu;

template <int DMAX>
constexpr int smem_floats() {
  return BM * DMAX + BN * (DMAX + 1) + BN * DMAX + kWarps * RPW * BN;
}

// ================================================================================
// Which (sequence, tile) a CTA takes: warp 0 scans the tiles per sequence
// ================================================================================

// Sets seq = -1 when tile_id is past the batch's real number of tiles.
__device__ void find_tile(const Params& p, int tile_id, int& seq, int& tile) {
  const int lane = threadIdx.x % 32;
  seq = -1, tile = 0;
  int before = 0;  // tiles of the sequences already scanned
  for (int s0 = 0; s0 < p.num_seqs; s0 += 32) {
    const int s = s0 + lane;
    const int n = s < p.num_seqs ? (seq_info(p, s).num_new * p.group + BM - 1) / BM : 0;
    int incl = n;  // inclusive prefix sum over the lanes
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int y = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += y;
    }
    const int total = __shfl_sync(kFull, incl, 31);
    if (tile_id < before + total) {
      const unsigned hit = __ballot_sync(kFull, before + incl > tile_id);
      const int first = __ffs(hit) - 1;
      const int excl = __shfl_sync(kFull, incl - n, first);
      seq = s0 + first;
      tile = tile_id - before - excl;
      return;
    }
    before += total;
  }
}

// ================================================================================
// Kernel
// ================================================================================

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) prefill_kernel(Params p) {
  pdl_begin();
  constexpr int NI = DMAX / 32;  // output dims per lane
  extern __shared__ __align__(16) float smem[];
  float* q_s = smem;                    // [BM][DMAX], pre-scaled, zero padded
  float* k_s = q_s + BM * DMAX;         // [BN][DMAX + 1] (padded: lane j reads row j)
  float* v_s = k_s + BN * (DMAX + 1);   // [BN][DMAX]
  float* p_s = v_s + BN * DMAX;         // [kWarps][RPW][BN]
  __shared__ int64_t key_off_s[BN];     // element offset of key j's row, or -1: skipped
  __shared__ int seq_s, tile_s;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    int seq, tile;
    find_tile(p, blockIdx.x, seq, tile);
    if (lane == 0) seq_s = seq, tile_s = tile;
  }
  __syncthreads();
  const int s = seq_s;
  if (s < 0) return;  // CTA-uniform
  const SeqInfo info = seq_info(p, s);
  const int kv_head = blockIdx.y;
  const int G = p.group, head_dim = p.head_dim;
  const int num_rows = info.num_new * G;
  const int row0 = tile_s * BM;
  const int last_row = min(row0 + BM, num_rows) - 1;
  const int kv_end = max(0, min(info.context_len + last_row / G + 1, info.seq_len));
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);

  for (int idx = threadIdx.x; idx < BM * DMAX; idx += kThreads) {
    const int r = idx / DMAX, d = idx % DMAX, row = row0 + r;
    float x = 0.0f;
    if (row < num_rows && d < head_dim) {
      const int64_t token = info.start + row / G, head = (int64_t)kv_head * G + row % G;
      x = p.q[token * p.q_stride0 + head * p.q_stride1 + d] * p.scale_log2;
    }
    q_s[idx] = x;
  }

  // This warp's rows: key positions < limit[r] are visible to row r (0 for padding rows).
  int limit[RPW];
  float m[RPW], l[RPW], acc[RPW][NI];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = row0 + warp * RPW + r;
    limit[r] = row < num_rows ? min(info.context_len + row / G + 1, info.seq_len) : 0;
    m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < NI; ++i) acc[r][i] = 0.0f;
  }

  for (int kt = 0; kt < kv_end; kt += BN) {
    __syncthreads();  // the previous tile's readers are done (and q_s is written)
    if (threadIdx.x < BN) {
      const int pos = kt + threadIdx.x;
      int64_t off = -1;
      if (pos < kv_end) {
        const int blk = pos / p.block_size;
        const int64_t id = physical_block(p, s, blk);
        if (id >= 0)
          off = ((id * p.block_size + (pos - blk * p.block_size)) * p.num_kv_heads + kv_head) *
                head_dim;
      }
      key_off_s[threadIdx.x] = off;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BN * DMAX; idx += kThreads) {
      const int j = idx / DMAX, d = idx % DMAX;
      const int64_t off = key_off_s[j];
      float kx = 0.0f, vx = 0.0f;
      if (off >= 0 && d < head_dim) kx = to_float(k_cache[off + d]), vx = to_float(v_cache[off + d]);
      k_s[j * (DMAX + 1) + d] = kx;
      v_s[idx] = vx;
    }
    __syncthreads();

    // S = Q K^T for this warp's rows; lane = key.
    float sc[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) sc[r] = 0.0f;
    const float* k_row = k_s + lane * (DMAX + 1);
    const float* q_rows = q_s + warp * RPW * DMAX;
#pragma unroll 2
    for (int d = 0; d < DMAX; d += 4) {
      const float k0 = k_row[d], k1 = k_row[d + 1], k2 = k_row[d + 2], k3 = k_row[d + 3];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const float4 qv = *reinterpret_cast<const float4*>(q_rows + r * DMAX + d);
        sc[r] += qv.x * k0 + qv.y * k1 + qv.z * k2 + qv.w * k3;
      }
    }

    // Online softmax: mask, row max over the warp, rescale, P to shared memory.
    const int pos = kt + lane;
    const bool key_ok = key_off_s[lane] >= 0;
    float* p_rows = p_s + warp * RPW * BN;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const float x = key_ok && pos < limit[r] ? sc[r] : -INFINITY;
      float mx = x;
#pragma unroll
      for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
      const float m_new = fmaxf(m[r], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet
      const float corr = exp2f(m[r] - m_use);
      const float pr = exp2f(x - m_use);
      l[r] = l[r] * corr + pr;
#pragma unroll
      for (int i = 0; i < NI; ++i) acc[r][i] *= corr;
      m[r] = m_new;
      p_rows[r * BN + lane] = pr;
    }
    __syncwarp();

    // O += P V; lane = dims lane + 32 i.
#pragma unroll 2
    for (int j = 0; j < BN; j += 4) {
      float vv[4][NI];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int i = 0; i < NI; ++i) vv[jj][i] = v_s[(j + jj) * DMAX + lane + 32 * i];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const float4 pv = *reinterpret_cast<const float4*>(p_rows + r * BN + j);
#pragma unroll
        for (int i = 0; i < NI; ++i)
          acc[r][i] += pv.x * vv[0][i] + pv.y * vv[1][i] + pv.z * vv[2][i] + pv.w * vv[3][i];
      }
    }
  }

  // l is per lane (its keys); the row's sum is over the warp.
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    float sum = l[r];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(kFull, sum, o);
    const int row = row0 + warp * RPW + r;
    if (row >= num_rows) continue;
    const int64_t token = info.start + row / G, head = (int64_t)kv_head * G + row % G;
    float* y = p.out + token * p.out_stride0 + head * p.out_stride1;
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) y[d] = sum == 0.0f ? 0.0f : acc[r][i] / sum;
    }
  }
}

template <typename T, int DMAX>
void launch(const Params& p, cudaStream_t stream) {
  constexpr int smem_bytes = smem_floats<DMAX>() * static_cast<int>(sizeof(float));
  // Once per instantiation, at the first (warm-up) call: never inside a graph capture.
  static const cudaError_t attr = cudaFuncSetAttribute(
      prefill_kernel<T, DMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  check_cuda(attr, "paged_attention", "cudaFuncSetAttribute");
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.group;
  const dim3 grid(static_cast<unsigned>((rows + BM - 1) / BM + p.num_seqs),
                  static_cast<unsigned>(p.num_kv_heads));
  launch_kernel(prefill_kernel<T, DMAX>, grid, kThreads, smem_bytes, stream, p);
}

template <typename T>
void launch_type(const Params& p, cudaStream_t stream) {
  if (p.head_dim <= 32)
    launch<T, 32>(p, stream);
  else if (p.head_dim <= 64)
    launch<T, 64>(p, stream);
  else if (p.head_dim <= 128)
    launch<T, 128>(p, stream);
  else
    launch<T, 256>(p, stream);
}

}  // namespace

// Caller guarantees 1 <= head_dim <= 256.
void launch_prefill(const Params& p, bool is_bf16, cudaStream_t stream) {
  if (is_bf16)
    launch_type<__nv_bfloat16>(p, stream);
  else
    launch_type<float>(p, stream);
}

}  // namespace attention
}  // namespace engine_cuda
