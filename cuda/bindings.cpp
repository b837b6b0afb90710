// pybind11 bindings for engine._C_cuda: the same Python names and argument order as
// engine._C, taking DeviceArrays. Each binding converts, releases the GIL and calls
// the launcher on engine's stream; validation lives in the launchers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "cuda_ops.h"
#include "device.h"

namespace py = pybind11;
using engine::TensorView;
using engine_cuda::DeviceArray;

namespace engine_cuda {
void bind_device_array(py::module_& m);
}

namespace {

using A = const DeviceArray&;

TensorView v(A a) { return a.view(); }

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "engine's CUDA kernels and device memory";
  m.def("device_count", &engine_cuda::device_count,
        "Number of CUDA devices visible (0 without a driver or a GPU).");
  engine_cuda::bind_device_array(m);
  namespace ec = engine_cuda;
  auto s = [] { return ec::engine_stream(); };

  m.def("matmul", [s](A x, A w, std::optional<DeviceArray> bias, A out) {
    TensorView bv = bias ? bias->view() : TensorView{};
    auto xv = v(x), wv = v(w), ov = v(out);
    py::gil_scoped_release nogil;
    ec::matmul(xv, wv, bv, ov, s());
  }, py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("out"));
  m.def("rms_norm", [s](A x, A weight, double eps, A out) {
    auto xv = v(x), wv = v(weight), ov = v(out);
    py::gil_scoped_release nogil;
    ec::rms_norm(xv, wv, eps, ov, s());
  }, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"));
  m.def("fused_add_rms_norm", [s](A x, A residual, A weight, double eps) {
    auto xv = v(x), rv = v(residual), wv = v(weight);
    py::gil_scoped_release nogil;
    ec::fused_add_rms_norm(xv, rv, wv, eps, s());
  }, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rope", [s](A positions, A q, A k, A cos_sin_cache, int64_t head_dim) {
    auto pv = v(positions), qv = v(q), kv = v(k), cv = v(cos_sin_cache);
    py::gil_scoped_release nogil;
    ec::rope(pv, qv, kv, cv, head_dim, s());
  }, py::arg("positions"), py::arg("q"), py::arg("k"), py::arg("cos_sin_cache"),
     py::arg("head_dim"));
  m.def("silu_and_mul", [s](A x, A out) {
    auto xv = v(x), ov = v(out);
    py::gil_scoped_release nogil;
    ec::silu_and_mul(xv, ov, s());
  }, py::arg("x"), py::arg("out"));
  m.def("embedding", [s](A ids, A table, A out) {
    auto iv = v(ids), tv = v(table), ov = v(out);
    py::gil_scoped_release nogil;
    ec::embedding(iv, tv, ov, s());
  }, py::arg("ids"), py::arg("table"), py::arg("out"));
  m.def("copy", [s](A src, A dst) {
    auto sv = v(src), dv = v(dst);
    py::gil_scoped_release nogil;
    ec::copy(sv, dv, s());
  }, py::arg("src"), py::arg("dst"));
  m.def("kv_cache_write", [s](A k, A vv, A k_cache, A v_cache, A slot_mapping) {
    auto kv = v(k), vv2 = v(vv), kc = v(k_cache), vc = v(v_cache), sm = v(slot_mapping);
    py::gil_scoped_release nogil;
    ec::kv_cache_write(kv, vv2, kc, vc, sm, s());
  }, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
     py::arg("slot_mapping"));
  m.def("kv_cache_copy", [s](A k_cache, A v_cache, A src_blocks, A dst_blocks) {
    auto kc = v(k_cache), vc = v(v_cache), sb = v(src_blocks), db = v(dst_blocks);
    py::gil_scoped_release nogil;
    ec::kv_cache_copy(kc, vc, sb, db, s());
  }, py::arg("k_cache"), py::arg("v_cache"), py::arg("src_blocks"), py::arg("dst_blocks"));
  m.def("paged_attention", [s](A q, A k_cache, A v_cache, A block_tables, A seq_lens,
                               A query_start_loc, double scale, A out) {
    auto qv = v(q), kc = v(k_cache), vc = v(v_cache), bt = v(block_tables), sl = v(seq_lens),
         ql = v(query_start_loc), ov = v(out);
    py::gil_scoped_release nogil;
    ec::paged_attention(qv, kc, vc, bt, sl, ql, scale, ov, s());
  }, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
     py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("scale"), py::arg("out"));
  m.def("sample", [s](A logits, A temperature, A top_k, A top_p, A min_p, A rng_state, A out) {
    auto lv = v(logits), tv = v(temperature), kv = v(top_k), pv = v(top_p), mv = v(min_p),
         rv = v(rng_state), ov = v(out);
    py::gil_scoped_release nogil;
    ec::sample(lv, tv, kv, pv, mv, rv, ov, s());
  }, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
     py::arg("min_p"), py::arg("rng_state"), py::arg("out"));
  m.def("apply_penalties", [s](A logits, A prompt_tokens, A prompt_offsets, A output_tokens,
                               A output_offsets, A presence, A frequency, A repetition,
                               A bias_ids, A bias_values, A bias_offsets) {
    TensorView a[] = {v(logits), v(prompt_tokens), v(prompt_offsets), v(output_tokens),
                      v(output_offsets), v(presence), v(frequency), v(repetition),
                      v(bias_ids), v(bias_values), v(bias_offsets)};
    py::gil_scoped_release nogil;
    ec::apply_penalties(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], s());
  }, py::arg("logits"), py::arg("prompt_tokens"), py::arg("prompt_offsets"),
     py::arg("output_tokens"), py::arg("output_offsets"), py::arg("presence_penalty"),
     py::arg("frequency_penalty"), py::arg("repetition_penalty"), py::arg("bias_ids"),
     py::arg("bias_values"), py::arg("bias_offsets"));
  m.def("log_softmax_topk", [s](A logits, A token_ids, int64_t k, A out_token_logprob,
                                A out_topk_ids, A out_topk_logprobs) {
    auto lv = v(logits), tv = v(token_ids), a = v(out_token_logprob), b = v(out_topk_ids),
         c = v(out_topk_logprobs);
    py::gil_scoped_release nogil;
    ec::log_softmax_topk(lv, tv, k, a, b, c, s());
  }, py::arg("logits"), py::arg("token_ids"), py::arg("k"), py::arg("out_token_logprob"),
     py::arg("out_topk_ids"), py::arg("out_topk_logprobs"));
}
