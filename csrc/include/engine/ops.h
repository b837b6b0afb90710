// Op declarations: the launchers. Each validates its arguments (throwing
// std::invalid_argument) and dispatches on dtype and instruction set. Every op
// writes into the output it is given and allocates no tensors.
// Activations are float32; weights float32, float16 or bfloat16.
#pragma once

#include <cstdint>
#include <string>

#include "engine/prefetch.h"
#include "engine/tensor.h"

namespace engine {

// ---- instruction set ---------------------------------------------------------
// "avx512" (F+BW+VL), "avx2" (AVX2+FMA+F16C) or "portable". Chosen once at
// import from what the CPU supports; ENGINE_ISA or set_isa() may lower it.
std::string isa();
std::string best_isa();
void set_isa(const std::string& name);  // throws if the CPU lacks it

// ---- matmul ------------------------------------------------------------------
// out = x @ w^T (+ bias)
//   x    [num_tokens, in_features]    f32, rows contiguous (any row stride)
//   w    [out_features, in_features]  f32/f16/bf16, contiguous
//   bias [out_features] f32 or absent
//   out  [num_tokens, out_features]   f32, rows contiguous (any row stride)
void matmul(const TensorView& x, const TensorView& w, const TensorView& bias,
            const TensorView& out);

// matmul with w packed for the CPU (ops.PackedWeight): row n, column k of the
// [out_features, in_features] weight is w[n / 8, k / 16, n % 8, k % 16]
//   w    [ceil(out_features / 8), ceil(in_features / 16), 8, 16]  f32/f16/bf16, contiguous;
//        the padding is never read
// Bit-identical to matmul on the unpacked weight.
void matmul_packed(const TensorView& x, const TensorView& w, int64_t out_features,
                   const TensorView& bias, const TensorView& out);

// ---- quantised matmul (GGUF block formats) -------------------------------------
// Weights stay in the blocks llama.cpp reads, laid along in_features (ggml's layouts):
//   q8_0: 32 values in 34 bytes: f16 d, 32 x i8 q                  w = d * q
//   q4_0: 32 values in 18 bytes: f16 d, 16 bytes of nibbles        w = d * (q - 8)
//   q4_1: 32 values in 20 bytes: f16 d, f16 m, nibbles             w = d * q + m
//   q4_k: 256 values in 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins,
//         128 bytes of nibbles                       w = d * sc_j * q - dmin * m_j per 32
//   q6_k: 256 values in 210 bytes: 128 bytes low nibbles, 64 bytes high 2 bits, 16 x i8
//         scales, f16 d                              w = d * sc_j * (q - 32) per 16
// A row of in_features values is in_features / block_values blocks, back to back.
enum class QuantFormat : int32_t { q8_0, q4_0, q4_1, q4_k, q6_k };
QuantFormat parse_quant_format(const std::string& name);  // throws, listing the known names
const char* quant_format_name(QuantFormat format);
int64_t quant_block_values(QuantFormat format);  // 32 or 256
int64_t quant_block_bytes(QuantFormat format);
// The kernel family quant_matmul uses now: "avx512_vnni", "avx2" or "portable".
std::string quant_kernel();

// out = x @ dequantise(w)^T (+ bias). Each row of x is quantised on the fly to q8 blocks
// of 32 (d = max|x| / 127, q = round-half-even(x / d)) for integer dot products; a block
// with NaN or inf makes its output row NaN.
//   x    [num_tokens, in_features]     f32, rows contiguous (any row stride);
//        in_features a multiple of the format's block_values
//   w    [out_features, in_features / block_values * block_bytes] u8, contiguous
//   bias [out_features] f32 or absent
//   out  [num_tokens, out_features]    f32, rows contiguous (any row stride)
//   interleave 1: w's rows one after another; 4 (q8_0, q4_0, q4_1 only): w in 4-row tiles
//        (kernels/quant_kernels.h: per 4 rows and 4 blocks, the 16 blocks' scales, then their
//        codes side by side in vector lanes), which the one-token AVX-512 kernel reads
//        without shuffling. The same results either way.
//   prefetch: bytes the one-token AVX-512 kernel requests while it streams w (engine/
//        prefetch.h: the KV blocks attention reads next); other kernels ignore it.
void quant_matmul(const TensorView& x, const TensorView& w, const std::string& format,
                  const TensorView& bias, const TensorView& out, int64_t interleave = 1,
                  const Prefetch* prefetch = nullptr);

// out[i] = dequantise(table[ids[i]]): an embedding table kept in its blocks.
//   ids [num_tokens] i32 in [0, vocab), table [vocab, row_bytes] u8 (rows contiguous; with
//   interleave 4 laid out as quant_matmul's w), out [num_tokens, hidden] f32 with
//   row_bytes = hidden / block_values * block_bytes.
void quant_embedding(const TensorView& ids, const TensorView& table, const std::string& format,
                     const TensorView& out, int64_t interleave = 1);

// interleave must be 1, or 4 with a 32-value block format; throws naming op otherwise.
void check_interleave(QuantFormat format, int64_t interleave, const char* op);

// out = src's q8_0 / q4_0 / q4_1 rows in the 4-row tiles of interleave 4 (to_tiles), or src's
// tiles as rows: src, out [n, row_bytes] u8 contiguous, not overlapping.
void quant_tiles(const TensorView& src, const std::string& format, bool to_tiles,
                 const TensorView& out);

// ---- norms -------------------------------------------------------------------
// out = x / sqrt(mean(x^2) + eps) * weight, per row.
//   x [num_tokens, hidden] f32, weight [hidden] f32/f16/bf16, out like x.
void rms_norm(const TensorView& x, const TensorView& weight, double eps, const TensorView& out);
// In place: residual += x; x = rms_norm(residual) * weight. (vLLM's fused_add_rms_norm.)
void fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                        const TensorView& weight, double eps);

// out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias per row, with s = x + residual
// when a residual is given (BERT's post-norm LayerNorm(sublayer(x) + x)), else s = x.
// Mean and (biased) variance in double. out may be x or residual itself.
//   x, residual, out [num_tokens, hidden] f32 (rows contiguous, any row stride)
//   weight, bias     [hidden] f32/f16/bf16 (residual and bias may be absent)
void layer_norm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                const TensorView& bias, double eps, const TensorView& out);

// ---- rope ----------------------------------------------------------------------
// In place, rotate_half (GPT-NeoX) layout, on the first rotary_dim of each head.
//   positions     [num_tokens] i32
//   q             [num_tokens, num_q_heads * head_dim]  f32 (any row stride)
//   k             [num_tokens, num_kv_heads * head_dim] f32 (any row stride)
//   cos_sin_cache [max_position, rotary_dim] f32: cos in the first half, sin in the second
void rope(const TensorView& positions, const TensorView& q, const TensorView& k,
          const TensorView& cos_sin_cache, int64_t head_dim);

// ---- activations ---------------------------------------------------------------
// out = silu(x[:, :d]) * x[:, d:], x [num_tokens, 2 * d] f32, out [num_tokens, d] f32.
void silu_and_mul(const TensorView& x, const TensorView& out);

// out = gelu(x) elementwise: x / 2 * (1 + erf(x / sqrt(2))), or with tanh_approximation
// x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))). out may be x itself.
//   x, out [num_tokens, d] f32 (rows contiguous, any row stride)
void gelu(const TensorView& x, const TensorView& out, bool tanh_approximation);

// ---- embedding -----------------------------------------------------------------
// out[i] = table[ids[i]], ids [num_tokens] i32, table [vocab, hidden] f32/f16/bf16,
// out [num_tokens, hidden] f32. An id outside [0, vocab) is an error.
void embedding(const TensorView& ids, const TensorView& table, const TensorView& out);

// ---- kv cache ------------------------------------------------------------------
// k_cache[slot / block_size, slot % block_size] = k[i] (and v) for slot = slot_mapping[i];
// a slot of -1 is skipped; a bf16 or f16 cache gets the values rounded to nearest even.
//   k, v          [num_tokens, num_kv_heads, head_dim] f32 (any token stride)
//   k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] f32, bf16 or
//                    f16 (both alike), contiguous
//   slot_mapping  [num_tokens] i32
void kv_cache_write(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                    const TensorView& v_cache, const TensorView& slot_mapping);

// rope(positions, q, k, ...) then kv_cache_write(k, v, ...) in one pass over the tokens (the
// same bits as the two calls): k is [num_tokens, num_kv_heads, head_dim]. Every position
// and slot is checked before anything is rotated or written.
void rope_kv_cache_write(const TensorView& positions, const TensorView& q, const TensorView& k,
                         const TensorView& v, const TensorView& cos_sin_cache, int64_t head_dim,
                         const TensorView& k_cache, const TensorView& v_cache,
                         const TensorView& slot_mapping);

// k_cache[dst_blocks[i]] = k_cache[src_blocks[i]] (and v), whole blocks: the K/V copy
// of copy-on-write. Ids in [0, num_blocks); no dst repeats or is also a src, so the
// pairs are independent.
//   k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] f32, bf16 or
//                    f16 (both alike), contiguous
//   src_blocks, dst_blocks [num_pairs] i32
void kv_cache_copy(const TensorView& k_cache, const TensorView& v_cache,
                   const TensorView& src_blocks, const TensorView& dst_blocks);

// ---- attention -----------------------------------------------------------------
// Causal attention over a paged cache, for a packed batch of sequences. Sequence s
// owns query rows [query_start_loc[s], query_start_loc[s+1]); it holds seq_lens[s]
// tokens in total (cached + new, the new ones already written to the cache), so its
// j-th new token sits at position seq_lens[s] - num_new + j and attends to positions
// 0..that position. Grouped-query: query head h reads KV head h / (num_q_heads / num_kv_heads).
//   q               [num_tokens, num_q_heads, head_dim] f32 (any token stride)
//   k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] f32, bf16 or f16 (alike)
//   block_tables    [num_seqs, max_blocks_per_seq] i32
//   seq_lens        [num_seqs] i32
//   query_start_loc [num_seqs + 1] i32
//   out             [num_tokens, num_q_heads, head_dim] f32
//   prefetch        bytes the AVX-512 kernel requests as it goes (engine/prefetch.h: the
//                   weights of the matmul after it); other kernels ignore it
void paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                     const TensorView& block_tables, const TensorView& seq_lens,
                     const TensorView& query_start_loc, double scale, const TensorView& out,
                     const Prefetch* prefetch = nullptr);

// Attention within each sequence of a packed batch, without a KV cache or padding:
// sequence s owns tokens [query_start_loc[s], query_start_loc[s+1]) of q, k and v, and
// each of its tokens attends to all of its tokens (causal = false: encoders), or to those
// at or before it (causal = true). Grouped-query: query head h reads KV head
// h / (num_heads / num_kv_heads).
//   q               [num_tokens, num_heads, head_dim] f32 (any token and head stride)
//   k, v            [num_tokens, num_kv_heads, head_dim] f32 (any token and head stride)
//   query_start_loc [num_seqs + 1] i32: 0, non-decreasing, ending at num_tokens
//   out             [num_tokens, num_heads, head_dim] f32, not overlapping q, k or v
void varlen_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& query_start_loc, double scale, bool causal,
                      const TensorView& out);

// ---- sampling ------------------------------------------------------------------
// One token per row of logits [num_seqs, vocab] f32 (not modified). Per row:
// temperature [num_seqs] f32 (0 = greedy, argmax with the lowest index on ties),
// top_k [num_seqs] i32 (<= 0: off), top_p [num_seqs] f32 (1: off), min_p [num_seqs] f32
// (0: off). rng_state [num_seqs] u64 is each sequence's own generator, advanced in
// place, so a row's draw never depends on the other rows. out [num_seqs] i32.
void sample(const TensorView& logits, const TensorView& temperature, const TensorView& top_k,
            const TensorView& top_p, const TensorView& min_p, const TensorView& rng_state,
            const TensorView& out);

// In place on logits [num_seqs, vocab] f32 (rows contiguous, any row stride): the
// OpenAI / vLLM penalties and logit bias, each sequence from its own CSR slices.
// Sequence s owns prompt_tokens[prompt_offsets[s] : prompt_offsets[s+1]] (and the
// same for output_tokens / bias_ids + bias_values); repeats are allowed. With
// c[v] = occurrences of v among s's output tokens, in this order:
//   1. repetition (HF / vLLM): v in the prompt or c[v] > 0 ->
//      logit > 0 ? logit / repetition_penalty[s] : logit * repetition_penalty[s]
//   2. logit -= frequency_penalty[s] * c[v] + presence_penalty[s] * (c[v] > 0)
//      (1 and 2 in double, rounded to float once)
//   3. logit += bias (float), for each (bias_ids[j], bias_values[j]) in list order,
//      so a repeated id adds each of its biases.
//   prompt_tokens  [num_prompt_tokens] i32,  prompt_offsets [num_seqs + 1] i32
//   output_tokens  [num_output_tokens] i32,  output_offsets [num_seqs + 1] i32
//   presence_penalty, frequency_penalty (finite), repetition_penalty (finite, > 0)
//                  [num_seqs] f32
//   bias_ids [num_bias] i32, bias_values [num_bias] f32 (no NaN or +inf),
//                  bias_offsets [num_seqs + 1] i32
// Offsets are non-decreasing, start >= 0 and end <= the length of their list (a
// longer workspace list is fine); every id they cover is in [0, vocab). All of it is
// checked before logits is written.
void apply_penalties(const TensorView& logits, const TensorView& prompt_tokens,
                     const TensorView& prompt_offsets, const TensorView& output_tokens,
                     const TensorView& output_offsets, const TensorView& presence_penalty,
                     const TensorView& frequency_penalty, const TensorView& repetition_penalty,
                     const TensorView& bias_ids, const TensorView& bias_values,
                     const TensorView& bias_offsets);

// Log-probabilities for OpenAI / vLLM `logprobs`, per row of logits [num_seqs, vocab]
// f32 (not modified): log_softmax(row) = (x - max) - log(sum(exp(x - max))), in double.
//   token_ids          [num_seqs] i32 in [0, vocab): the chosen token of each row
//   out_token_logprob  [num_seqs] f32: log_softmax(row)[token_ids[row]]
//   out_topk_ids       [num_seqs, k] i32: the k most probable ids, best first,
//                      ties to the lower id (0 <= k <= vocab)
//   out_topk_logprobs  [num_seqs, k] f32: their log-probabilities
// A row with NaN or +inf, or with every logit -inf, is an error; -inf gives -inf.
void log_softmax_topk(const TensorView& logits, const TensorView& token_ids, int64_t k,
                      const TensorView& out_token_logprob, const TensorView& out_topk_ids,
                      const TensorView& out_topk_logprobs);

}  // namespace engine
