// pybind11 bindings for engine._C: convert numpy arrays to TensorViews (no
// copies), release the GIL, call the launcher. Validation lives in the launchers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/numpy.h>

#include <optional>
#include <string>

#include "engine/check.h"
#include "engine/ops.h"

namespace py = pybind11;
using engine::DType;
using engine::TensorView;

namespace {

DType dtype_of(const py::array& a, const char* op, const char* arg) {
  py::dtype dt = a.dtype();
  char kind = dt.kind();
  auto size = dt.itemsize();
  if (kind == 'f' && size == 4) return DType::f32;
  if (kind == 'f' && size == 2) return DType::f16;
  if (kind == 'i' && size == 4) return DType::i32;
  if (kind == 'i' && size == 8) return DType::i64;
  if (kind == 'u' && size == 1) return DType::u8;
  if (kind == 'u' && size == 8) return DType::u64;
  std::string name = py::str(dt.attr("name"));
  if (name == "bfloat16") return DType::bf16;
  engine::fail(op, std::string(arg) + " has unsupported dtype " + name);
}

TensorView view_of(const py::array& a, const char* op, const char* arg, bool is_output = false) {
  TensorView t;
  ENGINE_CHECK(
      a.ndim() <= engine::kMaxDims, op,
      std::string(arg) + " has " + std::to_string(a.ndim()) + " dims; at most 4 are supported");
  if (is_output) ENGINE_CHECK(a.writeable(), op, std::string(arg) + " must be a writeable array");
  t.dtype = dtype_of(a, op, arg);
  t.ndim = static_cast<int>(a.ndim());
  auto itemsize = static_cast<int64_t>(a.itemsize());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = a.shape(i);
    int64_t s = a.strides(i);
    ENGINE_CHECK(
        s % itemsize == 0 && s >= 0, op,
        std::string(arg) + " has a stride that is negative or not a multiple of its item size");
    t.strides[i] = s / itemsize;
  }
  t.data = const_cast<void*>(a.data());
  return t;
}

TensorView optional_view(const std::optional<py::array>& a, const char* op, const char* arg) {
  return a ? view_of(*a, op, arg) : TensorView{};
}

// The byte ranges of C-contiguous arrays, for a kernel to request as it goes (a hint: the
// kernel only prefetches them).
engine::Prefetch prefetch_of(const std::vector<py::array>& arrays, const char* op) {
  engine::Prefetch p;
  ENGINE_CHECK(static_cast<int>(arrays.size()) <= engine::Prefetch::kMaxRanges, op,
               "prefetch takes at most " + std::to_string(engine::Prefetch::kMaxRanges) +
                   " arrays, got " + std::to_string(arrays.size()));
  for (const py::array& a : arrays) {
    ENGINE_CHECK(a.flags() & py::array::c_style, op,
                 "prefetch array " + std::to_string(p.count) + " must be C-contiguous");
    p.begin[p.count] = static_cast<const char*>(a.data());
    p.bytes[p.count] = static_cast<int64_t>(a.nbytes());
    ++p.count;
  }
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "engine's CPU kernels";

  m.def("isa", &engine::isa, "The instruction set in use: avx512, avx2 or portable.");
  m.def("best_isa", &engine::best_isa, "The best instruction set this CPU supports.");
  m.def("set_isa", &engine::set_isa, py::arg("name"),
        "Use the named instruction set (avx512, avx2, portable); ValueError if the CPU lacks it.");

  m.def(
      "matmul",
      [](py::array x, py::array w, std::optional<py::array> bias, py::array out) {
        auto xv = view_of(x, "matmul", "x"), wv = view_of(w, "matmul", "w");
        auto bv = optional_view(bias, "matmul", "bias"), ov = view_of(out, "matmul", "out", true);
        py::gil_scoped_release nogil;
        engine::matmul(xv, wv, bv, ov);
      },
      py::arg("x").noconvert(), py::arg("w").noconvert(), py::arg("bias").noconvert() = py::none(),
      py::arg("out").noconvert());

  m.def(
      "matmul_packed",
      [](py::array x, py::array w, int64_t out_features, std::optional<py::array> bias,
         py::array out) {
        const char* op = "matmul_packed";
        auto xv = view_of(x, op, "x"), wv = view_of(w, op, "w");
        auto bv = optional_view(bias, op, "bias"), ov = view_of(out, op, "out", true);
        py::gil_scoped_release nogil;
        engine::matmul_packed(xv, wv, out_features, bv, ov);
      },
      py::arg("x").noconvert(), py::arg("w").noconvert(), py::arg("out_features"),
      py::arg("bias").noconvert() = py::none(), py::arg("out").noconvert());

  m.def(
      "quant_matmul",
      [](py::array x, py::array w, const std::string& format, std::optional<py::array> bias,
         py::array out, int64_t interleave, const std::vector<py::array>& prefetch) {
        const char* op = "quant_matmul";
        auto xv = view_of(x, op, "x"), wv = view_of(w, op, "w");
        auto bv = optional_view(bias, op, "bias"), ov = view_of(out, op, "out", true);
        const engine::Prefetch pf = prefetch_of(prefetch, op);
        py::gil_scoped_release nogil;
        engine::quant_matmul(xv, wv, format, bv, ov, interleave, &pf);
      },
      py::arg("x").noconvert(), py::arg("w").noconvert(), py::arg("format"),
      py::arg("bias").noconvert() = py::none(), py::arg("out").noconvert(),
      py::arg("interleave") = 1, py::arg("prefetch") = std::vector<py::array>{});

  m.def(
      "quant_embedding",
      [](py::array ids, py::array table, const std::string& format, py::array out,
         int64_t interleave) {
        const char* op = "quant_embedding";
        auto iv = view_of(ids, op, "ids"), tv = view_of(table, op, "table");
        auto ov = view_of(out, op, "out", true);
        py::gil_scoped_release nogil;
        engine::quant_embedding(iv, tv, format, ov, interleave);
      },
      py::arg("ids").noconvert(), py::arg("table").noconvert(), py::arg("format"),
      py::arg("out").noconvert(), py::arg("interleave") = 1);

  m.def(
      "quant_tiles",
      [](py::array src, const std::string& format, bool to_tiles, py::array out) {
        const char* op = "quant_tiles";
        auto sv = view_of(src, op, "src"), ov = view_of(out, op, "out", true);
        py::gil_scoped_release nogil;
        engine::quant_tiles(sv, format, to_tiles, ov);
      },
      py::arg("src").noconvert(), py::arg("format"), py::arg("to_tiles"),
      py::arg("out").noconvert());

  m.def("quant_kernel", &engine::quant_kernel,
        "The quantised matmul kernels in use: avx512_vnni, avx2 or portable.");

  m.def(
      "rms_norm",
      [](py::array x, py::array weight, double eps, py::array out) {
        auto xv = view_of(x, "rms_norm", "x"), wv = view_of(weight, "rms_norm", "weight");
        auto ov = view_of(out, "rms_norm", "out", true);
        py::gil_scoped_release nogil;
        engine::rms_norm(xv, wv, eps, ov);
      },
      py::arg("x").noconvert(), py::arg("weight").noconvert(), py::arg("eps"),
      py::arg("out").noconvert());

  m.def(
      "fused_add_rms_norm",
      [](py::array x, py::array residual, py::array weight, double eps) {
        const char* op = "fused_add_rms_norm";
        auto xv = view_of(x, op, "x", true), rv = view_of(residual, op, "residual", true);
        auto wv = view_of(weight, op, "weight");
        py::gil_scoped_release nogil;
        engine::fused_add_rms_norm(xv, rv, wv, eps);
      },
      py::arg("x").noconvert(), py::arg("residual").noconvert(), py::arg("weight").noconvert(),
      py::arg("eps"));

  m.def(
      "rope",
      [](py::array positions, py::array q, py::array k, py::array cos_sin_cache, int64_t head_dim) {
        auto pv = view_of(positions, "rope", "positions");
        auto qv = view_of(q, "rope", "q", true), kv = view_of(k, "rope", "k", true);
        auto cv = view_of(cos_sin_cache, "rope", "cos_sin_cache");
        py::gil_scoped_release nogil;
        engine::rope(pv, qv, kv, cv, head_dim);
      },
      py::arg("positions").noconvert(), py::arg("q").noconvert(), py::arg("k").noconvert(),
      py::arg("cos_sin_cache").noconvert(), py::arg("head_dim"));

  m.def(
      "silu_and_mul",
      [](py::array x, py::array out) {
        auto xv = view_of(x, "silu_and_mul", "x"), ov = view_of(out, "silu_and_mul", "out", true);
        py::gil_scoped_release nogil;
        engine::silu_and_mul(xv, ov);
      },
      py::arg("x").noconvert(), py::arg("out").noconvert());

  m.def(
      "embedding",
      [](py::array ids, py::array table, py::array out) {
        auto iv = view_of(ids, "embedding", "ids"), tv = view_of(table, "embedding", "table");
        auto ov = view_of(out, "embedding", "out", true);
        py::gil_scoped_release nogil;
        engine::embedding(iv, tv, ov);
      },
      py::arg("ids").noconvert(), py::arg("table").noconvert(), py::arg("out").noconvert());

  m.def(
      "kv_cache_write",
      [](py::array k, py::array v, py::array k_cache, py::array v_cache, py::array slot_mapping) {
        const char* op = "kv_cache_write";
        auto kv = view_of(k, op, "k"), vv = view_of(v, op, "v");
        auto kc = view_of(k_cache, op, "k_cache", true), vc = view_of(v_cache, op, "v_cache", true);
        auto sm = view_of(slot_mapping, op, "slot_mapping");
        py::gil_scoped_release nogil;
        engine::kv_cache_write(kv, vv, kc, vc, sm);
      },
      py::arg("k").noconvert(), py::arg("v").noconvert(), py::arg("k_cache").noconvert(),
      py::arg("v_cache").noconvert(), py::arg("slot_mapping").noconvert());

  m.def(
      "rope_kv_cache_write",
      [](py::array positions, py::array q, py::array k, py::array v, py::array cos_sin_cache,
         int64_t head_dim, py::array k_cache, py::array v_cache, py::array slot_mapping) {
        const char* op = "rope_kv_cache_write";
        auto pv = view_of(positions, op, "positions");
        auto qv = view_of(q, op, "q", true), kv = view_of(k, op, "k", true);
        auto vv = view_of(v, op, "v"), cv = view_of(cos_sin_cache, op, "cos_sin_cache");
        auto kc = view_of(k_cache, op, "k_cache", true), vc = view_of(v_cache, op, "v_cache", true);
        auto sm = view_of(slot_mapping, op, "slot_mapping");
        py::gil_scoped_release nogil;
        engine::rope_kv_cache_write(pv, qv, kv, vv, cv, head_dim, kc, vc, sm);
      },
      py::arg("positions").noconvert(), py::arg("q").noconvert(), py::arg("k").noconvert(),
      py::arg("v").noconvert(), py::arg("cos_sin_cache").noconvert(), py::arg("head_dim"),
      py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(),
      py::arg("slot_mapping").noconvert());

  m.def(
      "kv_cache_copy",
      [](py::array k_cache, py::array v_cache, py::array src_blocks, py::array dst_blocks) {
        const char* op = "kv_cache_copy";
        auto kc = view_of(k_cache, op, "k_cache", true), vc = view_of(v_cache, op, "v_cache", true);
        auto sv = view_of(src_blocks, op, "src_blocks"), dv = view_of(dst_blocks, op, "dst_blocks");
        py::gil_scoped_release nogil;
        engine::kv_cache_copy(kc, vc, sv, dv);
      },
      py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(),
      py::arg("src_blocks").noconvert(), py::arg("dst_blocks").noconvert());

  m.def(
      "paged_attention",
      [](py::array q, py::array k_cache, py::array v_cache, py::array block_tables,
         py::array seq_lens, py::array query_start_loc, double scale, py::array out,
         const std::vector<py::array>& prefetch) {
        const char* op = "paged_attention";
        auto qv = view_of(q, op, "q");
        auto kc = view_of(k_cache, op, "k_cache"), vc = view_of(v_cache, op, "v_cache");
        auto bt = view_of(block_tables, op, "block_tables"), sl = view_of(seq_lens, op, "seq_lens");
        auto qs = view_of(query_start_loc, op, "query_start_loc");
        auto ov = view_of(out, op, "out", true);
        const engine::Prefetch pf = prefetch_of(prefetch, op);
        py::gil_scoped_release nogil;
        engine::paged_attention(qv, kc, vc, bt, sl, qs, scale, ov, &pf);
      },
      py::arg("q").noconvert(), py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(),
      py::arg("block_tables").noconvert(), py::arg("seq_lens").noconvert(),
      py::arg("query_start_loc").noconvert(), py::arg("scale"), py::arg("out").noconvert(),
      py::arg("prefetch") = std::vector<py::array>{});

  m.def(
      "sample",
      [](py::array logits, py::array temperature, py::array top_k, py::array top_p,
         py::array min_p, py::array rng_state, py::array out) {
        const char* op = "sample";
        auto lv = view_of(logits, op, "logits"), tv = view_of(temperature, op, "temperature");
        auto kv = view_of(top_k, op, "top_k"), pv = view_of(top_p, op, "top_p");
        auto mv = view_of(min_p, op, "min_p"), rv = view_of(rng_state, op, "rng_state", true);
        auto ov = view_of(out, op, "out", true);
        py::gil_scoped_release nogil;
        engine::sample(lv, tv, kv, pv, mv, rv, ov);
      },
      py::arg("logits").noconvert(), py::arg("temperature").noconvert(),
      py::arg("top_k").noconvert(), py::arg("top_p").noconvert(), py::arg("min_p").noconvert(),
      py::arg("rng_state").noconvert(), py::arg("out").noconvert());

  m.def(
      "apply_penalties",
      [](py::array logits, py::array prompt_tokens, py::array prompt_offsets,
         py::array output_tokens, py::array output_offsets, py::array presence_penalty,
         py::array frequency_penalty, py::array repetition_penalty, py::array bias_ids,
         py::array bias_values, py::array bias_offsets) {
        const char* op = "apply_penalties";
        auto lv = view_of(logits, op, "logits", true);
        auto pt = view_of(prompt_tokens, op, "prompt_tokens");
        auto po = view_of(prompt_offsets, op, "prompt_offsets");
        auto ot = view_of(output_tokens, op, "output_tokens");
        auto oo = view_of(output_offsets, op, "output_offsets");
        auto pp = view_of(presence_penalty, op, "presence_penalty");
        auto fp = view_of(frequency_penalty, op, "frequency_penalty");
        auto rp = view_of(repetition_penalty, op, "repetition_penalty");
        auto bi = view_of(bias_ids, op, "bias_ids"), bv = view_of(bias_values, op, "bias_values");
        auto bo = view_of(bias_offsets, op, "bias_offsets");
        py::gil_scoped_release nogil;
        engine::apply_penalties(lv, pt, po, ot, oo, pp, fp, rp, bi, bv, bo);
      },
      py::arg("logits").noconvert(), py::arg("prompt_tokens").noconvert(),
      py::arg("prompt_offsets").noconvert(), py::arg("output_tokens").noconvert(),
      py::arg("output_offsets").noconvert(), py::arg("presence_penalty").noconvert(),
      py::arg("frequency_penalty").noconvert(), py::arg("repetition_penalty").noconvert(),
      py::arg("bias_ids").noconvert(), py::arg("bias_values").noconvert(),
      py::arg("bias_offsets").noconvert());

  m.def(
      "log_softmax_topk",
      [](py::array logits, py::array token_ids, int64_t k, py::array out_token_logprob,
         py::array out_topk_ids, py::array out_topk_logprobs) {
        const char* op = "log_softmax_topk";
        auto lv = view_of(logits, op, "logits"), tv = view_of(token_ids, op, "token_ids");
        auto ov = view_of(out_token_logprob, op, "out_token_logprob", true);
        auto iv = view_of(out_topk_ids, op, "out_topk_ids", true);
        auto pv = view_of(out_topk_logprobs, op, "out_topk_logprobs", true);
        py::gil_scoped_release nogil;
        engine::log_softmax_topk(lv, tv, k, ov, iv, pv);
      },
      py::arg("logits").noconvert(), py::arg("token_ids").noconvert(), py::arg("k"),
      py::arg("out_token_logprob").noconvert(), py::arg("out_topk_ids").noconvert(),
      py::arg("out_topk_logprobs").noconvert());

  m.def(
      "layer_norm",
      [](py::array x, std::optional<py::array> residual, py::array weight,
         std::optional<py::array> bias, double eps, py::array out) {
        const char* op = "layer_norm";
        auto xv = view_of(x, op, "x"), rv = optional_view(residual, op, "residual");
        auto wv = view_of(weight, op, "weight"), bv = optional_view(bias, op, "bias");
        auto ov = view_of(out, op, "out", true);
        py::gil_scoped_release nogil;
        engine::layer_norm(xv, rv, wv, bv, eps, ov);
      },
      py::arg("x").noconvert(), py::arg("residual").noconvert() = py::none(),
      py::arg("weight").noconvert(), py::arg("bias").noconvert() = py::none(), py::arg("eps"),
      py::arg("out").noconvert());

  m.def(
      "gelu",
      [](py::array x, py::array out, bool tanh_approximation) {
        auto xv = view_of(x, "gelu", "x"), ov = view_of(out, "gelu", "out", true);
        py::gil_scoped_release nogil;
        engine::gelu(xv, ov, tanh_approximation);
      },
      py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("tanh_approximation"));

  m.def(
      "varlen_attention",
      [](py::array q, py::array k, py::array v, py::array query_start_loc, double scale,
         bool causal, py::array out) {
        const char* op = "varlen_attention";
        auto qv = view_of(q, op, "q"), kv = view_of(k, op, "k"), vv = view_of(v, op, "v");
        auto qs = view_of(query_start_loc, op, "query_start_loc");
        auto ov = view_of(out, op, "out", true);
        py::gil_scoped_release nogil;
        engine::varlen_attention(qv, kv, vv, qs, scale, causal, ov);
      },
      py::arg("q").noconvert(), py::arg("k").noconvert(), py::arg("v").noconvert(),
      py::arg("query_start_loc").noconvert(), py::arg("scale"), py::arg("causal"),
      py::arg("out").noconvert());
}
