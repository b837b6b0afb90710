"""engine on one NVIDIA GPU, side by side with transformers, against the HBM roofline.

    python benchmarks/bench_cuda.py [--out DIR] [--batches 1,32,128,256] [--quick]

A TinyLlama-1.1B-shaped Llama (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000) with random bf16 weights is written as a Hugging
Face folder; engine (device="cuda", CUDA graphs) and transformers' `generate`
(eager, bf16, sdpa) run it on the same GPU: 128-token prompts, 128 new tokens,
greedy, ignore EOS, at each batch size. Also printed: batch-1 decode against the
roofline (weight bytes per token over the measured device copy bandwidth), matmul
TFLOP/s against torch.matmul at the model's shapes, and decode-attention GB/s at
1k-8k contexts. Writes bench_cuda.json and bench_cuda.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

SHAPE = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, intermediate_size=5632, vocab_size=32000)
PROMPT_LEN, NEW_TOKENS = 128, 128


def make_model(path: str):
    """Random bf16 weights (std 0.02, norms near 1) saved as a Hugging Face folder."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**SHAPE, max_position_embeddings=2048, rms_norm_eps=1e-5,
                                      rope_theta=10000.0, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
                                      architectures=["LlamaForCausalLM"])
    config.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  transformers.LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = {}
    for name, shape in shapes.items():
        if "norm" in name:
            t = 1.0 + 0.05 * torch.randn(shape, device="cuda", generator=g)
        else:
            t = 0.02 * torch.randn(shape, device="cuda", generator=g)
        weights[name] = t.to(torch.bfloat16).cpu()
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return sum(v.numel() for v in weights.values())


def weight_bytes_per_token() -> int:
    """Bytes of weights one decode step reads (every linear layer and the LM head)."""
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    per_layer = (h + 2 * kv) * h + h * h + 2 * i * h + h * i
    return 2 * (SHAPE["num_hidden_layers"] * per_layer + v * h)


def copy_bandwidth(torch) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(23):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() / statistics.median(times[3:])


# ---- end to end ------------------------------------------------------------------------

def prompts_for(batch: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, SHAPE["vocab_size"], (batch, PROMPT_LEN)).tolist()


def engine_run(llm, batch: int, new_tokens: int) -> float:
    from engine import SamplingParams, ops

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in prompts_for(batch)]
    ops.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return elapsed


def hf_run(model, torch, batch: int, new_tokens: int) -> float:
    ids = torch.tensor(prompts_for(batch), device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert out.shape == (batch, PROMPT_LEN + new_tokens)
    return elapsed


def end_to_end(path: str, batches: list[int], torch, peers: bool, repeats: int) -> dict:
    from engine import LLM

    llm = LLM(path, skip_tokenizer_init=True, device="cuda", max_model_len=512,
              max_num_seqs=max(batches), max_num_batched_tokens=8192, kv_cache_gib=8.0,
              enable_prefix_caching=False)
    engine_run(llm, 2, 4)  # warm up
    rows = {}
    # batch-1 decode alone: 129 new tokens minus 1 (the prefill step) over the extra time
    t1 = min(engine_run(llm, 1, 1) for _ in range(3))
    t129 = statistics.median(engine_run(llm, 1, NEW_TOKENS + 1) for _ in range(repeats))
    decode_b1 = NEW_TOKENS / (t129 - t1)
    forward_b1 = graph_replay_seconds(llm)
    for b in batches:
        e = statistics.median(engine_run(llm, b, NEW_TOKENS) for _ in range(repeats))
        rows[b] = {"engine_tok_s": b * NEW_TOKENS / e, "engine_s": e}
    del llm
    # the same forward graph with plain launches (no programmatic dependent launch)
    from engine import _C_cuda

    plain_b1 = None
    if _C_cuda.programmatic_launch():
        _C_cuda.set_programmatic_launch(False)
        try:
            plain = LLM(path, skip_tokenizer_init=True, device="cuda", max_model_len=512,
                        max_num_seqs=1, kv_cache_gib=1.0, enable_prefix_caching=False)
            engine_run(plain, 1, 4)
            plain_b1 = graph_replay_seconds(plain) * 1e3
            t1p = min(engine_run(plain, 1, 1) for _ in range(3))
            t129p = statistics.median(engine_run(plain, 1, NEW_TOKENS + 1) for _ in range(repeats))
            plain_decode_b1 = NEW_TOKENS / (t129p - t1p)
            del plain
        finally:
            _C_cuda.set_programmatic_launch(True)
    if peers:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16).cuda().eval()
        hf_run(model, torch, 2, 4)
        for b in batches:
            h = statistics.median(hf_run(model, torch, b, NEW_TOKENS) for _ in range(max(1, repeats - 1)))
            rows[b].update(hf_tok_s=b * NEW_TOKENS / h, hf_s=h)
        del model
        torch.cuda.empty_cache()
    out = {"decode_b1_tok_s": decode_b1, "forward_b1_graph_ms": forward_b1 * 1e3,
           "batches": rows}
    if plain_b1 is not None:
        out.update(plain_launch_forward_b1_graph_ms=plain_b1,
                   plain_launch_decode_b1_tok_s=plain_decode_b1)
    return out


def graph_replay_seconds(llm, reps: int = 100) -> float:
    """GPU time of one batch-1 decode forward: the captured graph replayed reps times back to
    back (the last staged inputs: a finished sequence's slot), over reps (median of 5)."""
    from engine import ops

    graph = llm.engine.runner.cuda_steps.graphs[1]
    times = []
    for _ in range(6):
        ops.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        ops.synchronize()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times[1:])


# ---- kernels ---------------------------------------------------------------------------

def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, captured reps times in one engine CUDA graph (median of 5)."""
    from engine import _C_cuda, ops

    fn()
    ops.synchronize()
    g = _C_cuda.Graph()
    g.capture_begin()
    for _ in range(reps):
        fn()
    g.capture_end()
    times = []
    for _ in range(6):
        ops.synchronize()
        t0 = time.perf_counter()
        g.replay()
        ops.synchronize()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times[1:])


def torch_time(torch, fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times[1:])


def matmuls(torch) -> list[dict]:
    from engine import ops

    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    shapes = {"qkv": (2560, h), "o_proj": (h, h), "gate_up": (2 * i, h), "down": (h, i),
              "lm_head": (v, h)}
    rows = []
    for m in (1, 32, 128, 256, 4096):
        for name, (n, k) in shapes.items():
            w = (0.02 * torch.randn(n, k, device="cuda")).to(torch.bfloat16)
            x = torch.randn(m, k, device="cuda")
            xb = x.to(torch.bfloat16)
            out = torch.empty(m, n, device="cuda")
            ew, ex, eo = ops.from_dlpack(w), ops.from_dlpack(x), ops.from_dlpack(out)
            te = graph_time(lambda: ops.matmul(ex, ew, out=eo))
            tt = torch_time(torch, lambda: torch.matmul(xb, w.t()))
            flops, bytes_ = 2 * m * n * k, 2 * n * k + 4 * m * k + 4 * m * n
            rows.append(dict(m=m, op=name, n=n, k=k, engine_us=te * 1e6, torch_us=tt * 1e6,
                             engine_tflops=flops / te / 1e12, torch_tflops=flops / tt / 1e12,
                             engine_gbs=bytes_ / te / 1e9))
    return rows


def decode_attention(torch) -> list[dict]:
    import ml_dtypes
    from engine import ops

    heads, kv_heads, hd, bs, batch = 32, 4, 64, 16, 32
    rows = []
    for ctx in (1024, 2048, 4096, 8192):
        blocks = ctx // bs
        cache_shape = (batch * blocks, bs, kv_heads, hd)
        k = ops.to_device((np.random.default_rng(0).standard_normal(cache_shape) * 0.5)
                          .astype(ml_dtypes.bfloat16))
        vc = ops.to_device((np.random.default_rng(1).standard_normal(cache_shape) * 0.5)
                           .astype(ml_dtypes.bfloat16))
        tables = ops.to_device(np.random.default_rng(2).permutation(batch * blocks)
                               .astype(np.int32).reshape(batch, blocks))
        seq_lens = ops.to_device(np.full(batch, ctx, np.int32))
        qsl = ops.to_device(np.arange(batch + 1, dtype=np.int32))
        q = ops.to_device(np.random.default_rng(3).standard_normal((batch, heads, hd))
                          .astype(np.float32))
        out = ops.empty((batch, heads, hd), np.float32, "cuda")
        t = graph_time(lambda: ops.paged_attention(q, k, vc, tables, seq_lens, qsl,
                                                   hd ** -0.5, out=out), reps=10)
        bytes_ = 2 * batch * ctx * kv_heads * hd * 2
        rows.append(dict(context=ctx, batch=batch, us=t * 1e6, gbs=bytes_ / t / 1e9))
        del k, vc
    return rows


def step_ops(torch) -> list[dict]:
    """The per-layer ops besides the matmuls at batch 1 (one decode token, a 256-token
    context in a 512-wide block table, bf16 cache): microseconds per launch in a graph."""
    import ml_dtypes
    from engine import ops
    from engine.model.rope import rope_cos_sin_cache

    rng = np.random.default_rng(0)
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    heads, kv_heads, hd, bs = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], 64, 16
    dev = lambda a: ops.to_device(np.ascontiguousarray(a))  # noqa: E731
    f32 = lambda *shape: dev(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    x, res, w = f32(1, h), f32(1, h), f32(h)
    qkv = f32(1, (heads + 2 * kv_heads) * hd)
    qs, ks = heads * hd, kv_heads * hd
    q, k, v = qkv[:, :qs], qkv[:, qs:qs + ks], qkv[:, qs + ks:]
    gu, act = f32(1, 2 * i), ops.empty((1, i), np.float32, "cuda")
    cos_sin = dev(rope_cos_sin_cache(hd, 2048, 10000.0))
    blocks = 64
    cache = lambda: dev((rng.standard_normal((blocks, bs, kv_heads, hd)) * 0.5)  # noqa: E731
                        .astype(ml_dtypes.bfloat16))
    kc, vc = cache(), cache()
    pos, slots = dev(np.array([255], np.int32)), dev(np.array([255], np.int32))
    tables = dev(np.arange(32, dtype=np.int32).reshape(1, 32))
    seq_lens, qsl = dev(np.array([256], np.int32)), dev(np.array([0, 1], np.int32))
    attn = ops.empty((1, heads, hd), np.float32, "cuda")
    cases = {
        "fused_add_rms_norm": lambda: ops.fused_add_rms_norm(x, res, w, 1e-5),
        "rope": lambda: ops.rope(pos, q, k, cos_sin, hd),
        "kv_cache_write": lambda: ops.kv_cache_write(k.reshape(1, kv_heads, hd),
                                                     v.reshape(1, kv_heads, hd), kc, vc, slots),
        "paged_attention": lambda: ops.paged_attention(q.reshape(1, heads, hd), kc, vc, tables,
                                                       seq_lens, qsl, hd ** -0.5, out=attn),
        "silu_and_mul": lambda: ops.silu_and_mul(gu, out=act),
    }
    return [dict(op=name, us=graph_time(fn) * 1e6) for name, fn in cases.items()]


# ---- report ------------------------------------------------------------------------------

def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["end_to_end"]["batches"]
    bs = sorted(int(b) for b in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(bs, [rows[b]["engine_tok_s"] for b in bs], "o-", label="engine (CUDA graphs)")
    if "hf_tok_s" in rows[bs[0]]:
        ax.plot(bs, [rows[b]["hf_tok_s"] for b in bs], "s--", label="transformers generate (eager)")
    roof = result["roofline_b1_tok_s"]
    ax.plot(bs, [roof * b for b in bs], ":", color="gray",
            label="HBM roofline (weights read once per step)")
    ax.scatter([1], [result["end_to_end"]["decode_b1_tok_s"]], marker="*", s=120, zorder=5,
               label="engine batch-1 decode only")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("output tokens/s (128-token prompts, 128 new)")
    ax.set_title(f"TinyLlama-1.1B shape, bf16, {result['device']}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: e2e, matmul, attention, ops")
    args = ap.parse_args(argv)
    import torch

    from engine import _C_cuda

    batches = [int(b) for b in args.batches.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    result = {"device": _C_cuda.device_name(), "torch": torch.__version__}
    result["copy_bandwidth_gbs"] = copy_bandwidth(torch) / 1e9
    result["weight_bytes_per_token"] = weight_bytes_per_token()
    result["roofline_b1_tok_s"] = result["copy_bandwidth_gbs"] * 1e9 / weight_bytes_per_token()
    print(f"device {result['device']}; copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s; "
          f"weights/token {weight_bytes_per_token() / 1e9:.3f} GB -> roofline "
          f"{result['roofline_b1_tok_s']:.0f} tok/s at batch 1", flush=True)
    if "matmul" not in skip:
        result["matmul"] = matmuls(torch)
        print(f"{'M':>5} {'op':>8} {'engine us':>10} {'torch us':>9} {'eng TF/s':>9} "
              f"{'torch TF/s':>10} {'eng GB/s':>9}")
        for r in result["matmul"]:
            print(f"{r['m']:>5} {r['op']:>8} {r['engine_us']:>10.1f} {r['torch_us']:>9.1f} "
                  f"{r['engine_tflops']:>9.1f} {r['torch_tflops']:>10.1f} {r['engine_gbs']:>9.0f}",
                  flush=True)
    if "attention" not in skip:
        result["decode_attention"] = decode_attention(torch)
        for r in result["decode_attention"]:
            print(f"decode attention ctx {r['context']:>5} x{r['batch']}: {r['us']:8.1f} us "
                  f"{r['gbs']:7.0f} GB/s", flush=True)
    if "ops" not in skip:
        result["step_ops"] = step_ops(torch)
        per_layer = 2 * result["step_ops"][0]["us"] + sum(r["us"] for r in result["step_ops"][1:])
        print("batch-1 ops besides the matmuls, us per launch: " +
              ", ".join(f"{r['op']} {r['us']:.1f}" for r in result["step_ops"]) +
              f"; per layer {per_layer:.1f} us", flush=True)
    if "e2e" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            params = make_model(tmp)
            print(f"model: {params / 1e9:.2f} B parameters, random bf16", flush=True)
            result["end_to_end"] = end_to_end(tmp, batches, torch, not args.no_transformers,
                                              args.repeats)
        e2e = result["end_to_end"]
        frac = e2e["decode_b1_tok_s"] / result["roofline_b1_tok_s"]
        print(f"\nbatch-1 decode: {e2e['decode_b1_tok_s']:.0f} tok/s = {frac:.0%} of the roofline "
              f"{result['roofline_b1_tok_s']:.0f}")
        step_ms, fwd_ms = 1e3 / e2e["decode_b1_tok_s"], e2e["forward_b1_graph_ms"]
        print(f"batch-1 step {step_ms:.3f} ms: forward graph alone {fwd_ms:.3f} ms on the GPU, "
              f"the rest (sampling, staging, host) {step_ms - fwd_ms:.3f} ms")
        if "plain_launch_forward_b1_graph_ms" in e2e:
            print(f"without programmatic dependent launch: forward graph "
                  f"{e2e['plain_launch_forward_b1_graph_ms']:.3f} ms, batch-1 decode "
                  f"{e2e['plain_launch_decode_b1_tok_s']:.0f} tok/s")
        print(f"{'batch':>6} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>7}")
        for b, r in e2e["batches"].items():
            hf = r.get("hf_tok_s")
            ratio = f"{r['engine_tok_s'] / hf:7.2f}x" if hf else "      -"
            print(f"{b:>6} {r['engine_tok_s']:>13.0f} {hf or 0:>19.0f} {ratio}")
        os.makedirs(args.out, exist_ok=True)
        plot(result, os.path.join(args.out, "bench_cuda.png"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cuda.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
