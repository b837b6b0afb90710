// The CUDA launchers: the same ops, names and argument order as csrc/include/engine/ops.h,
// on device memory. Every TensorView's data is a device pointer (shape and strides in
// elements, as on the CPU); every op takes the stream it runs on and writes into the
// outputs it is given.
//
// Rules that make a decode step capturable as a CUDA graph:
//   - no allocation and no host synchronisation inside an op (a kernel's scratch is a
//     grow-only buffer that is sized outside capture; growing it while the stream is
//     capturing is an error);
//   - launch configuration depends only on shapes, never on array values (seq_lens,
//     positions, ids are read on the device), so a replay with new values is correct.
// Argument checks (dtype, ndim, shapes, contiguity) happen on the host, as on the CPU.
// Values that only the device sees (ids, slots, block ids) are not checked on the host
// (that would need a sync); a kernel guards every index it reads with and skips (or
// writes zeros for) one that is out of range, so bad values never read or write out of
// bounds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/tensor.h"

namespace engine_cuda {

using engine::TensorView;

// ---- device and errors ---------------------------------------------------------
int device_count();
// Throws std::runtime_error("<op>: <what>: <cuda error string>") unless err is cudaSuccess.
void check_cuda(cudaError_t err, const char* op, const char* what);
// After a launch: cudaGetLastError through check_cuda.
void check_launch(const char* op);
// The streams' capture state: true while `stream` is being captured into a graph.
bool is_capturing(cudaStream_t stream);

// ---- matmul --------------------------------------------------------------------
// out = x @ w^T (+ bias)
//   x    [num_tokens, in_features]    f32, rows contiguous (any row stride)
//   w    [out_features, in_features]  f32/f16/bf16, contiguous
//   bias [out_features] f32 or absent (data == nullptr)
//   out  [num_tokens, out_features]   f32, rows contiguous (any row stride)
// f16/bf16 weights: small num_tokens use a bandwidth-bound kernel (f32 math);
// large num_tokens use tensor cores, with x rounded to w's dtype, accumulating in f32.
void matmul(const TensorView& x, const TensorView& w, const TensorView& bias,
            const TensorView& out, cudaStream_t stream);

// ---- norms, rope, activations, embedding, copy ---------------------------------------
void rms_norm(const TensorView& x, const TensorView& weight, double eps, const TensorView& out,
              cudaStream_t stream);
void fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                        const TensorView& weight, double eps, cudaStream_t stream);
void rope(const TensorView& positions, const TensorView& q, const TensorView& k,
          const TensorView& cos_sin_cache, int64_t head_dim, cudaStream_t stream);
void silu_and_mul(const TensorView& x, const TensorView& out, cudaStream_t stream);
// out[i] = table[ids[i]]; table f32/f16/bf16, out f32. An id outside [0, vocab) gives a
// row of zeros. Also the row gather of the model (table = hidden states).
void embedding(const TensorView& ids, const TensorView& table, const TensorView& out,
               cudaStream_t stream);
// dst = src, same shape, same dtype, rows contiguous (any row strides); up to 2-d.
void copy(const TensorView& src, const TensorView& dst, cudaStream_t stream);

// ---- kv cache ------------------------------------------------------------------------
// As on the CPU, but the cache may be f32 or bf16 (k, v stay f32; the write rounds).
//   k, v             [num_tokens, num_kv_heads, head_dim] f32 (any token stride)
//   k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] f32/bf16 contiguous
//   slot_mapping     [num_tokens] i32; -1 (or any slot out of range) is skipped
void kv_cache_write(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                    const TensorView& v_cache, const TensorView& slot_mapping,
                    cudaStream_t stream);
//   src_blocks, dst_blocks [num_pairs] i32; a pair with an id out of range is skipped
void kv_cache_copy(const TensorView& k_cache, const TensorView& v_cache,
                   const TensorView& src_blocks, const TensorView& dst_blocks,
                   cudaStream_t stream);

// ---- attention -----------------------------------------------------------------------
// Causal attention of a packed batch over the paged cache (semantics as the CPU op).
//   q               [num_tokens, num_q_heads, head_dim] f32 (any token stride)
//   k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] f32/bf16
//   block_tables    [num_seqs, max_blocks_per_seq] i32
//   seq_lens        [num_seqs] i32
//   query_start_loc [num_seqs + 1] i32
//   out             [num_tokens, num_q_heads, head_dim] f32
void paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                     const TensorView& block_tables, const TensorView& seq_lens,
                     const TensorView& query_start_loc, double scale, const TensorView& out,
                     cudaStream_t stream);

// ---- sampling ------------------------------------------------------------------------
// Semantics as the CPU ops (csrc/include/engine/ops.h), on device arrays.
void sample(const TensorView& logits, const TensorView& temperature, const TensorView& top_k,
            const TensorView& top_p, const TensorView& min_p, const TensorView& rng_state,
            const TensorView& out, cudaStream_t stream);
void apply_penalties(const TensorView& logits, const TensorView& prompt_tokens,
                     const TensorView& prompt_offsets, const TensorView& output_tokens,
                     const TensorView& output_offsets, const TensorView& presence_penalty,
                     const TensorView& frequency_penalty, const TensorView& repetition_penalty,
                     const TensorView& bias_ids, const TensorView& bias_values,
                     const TensorView& bias_offsets, cudaStream_t stream);
void log_softmax_topk(const TensorView& logits, const TensorView& token_ids, int64_t k,
                      const TensorView& out_token_logprob, const TensorView& out_topk_ids,
                      const TensorView& out_topk_logprobs, cudaStream_t stream);

}  // namespace engine_cuda
