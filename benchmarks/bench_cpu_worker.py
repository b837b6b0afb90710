"""One bench_cpu measurement in a fresh process: prints a JSON line.

    python benchmarks/bench_cpu_worker.py {engine,llama.cpp,transformers} MODEL
        [--threads 2] [--prompt-len 512] [--new-tokens 128] [--batch 1]
        [--kv-cache-dtype float16]

batch 1: prefill tok/s (one step over the whole prompt) and decode tok/s (every token after
the first). batch N (engine only): N sequences of 32-token prompts, decode tok/s over the
steps after their prefill, and just before, in the same process, one such sequence alone
(batch1_decode_tps): the ratio of the two is paired, not split across minutes of drift.
Peak RSS is this process's (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np


def peak_rss() -> int:
    """This process's peak resident set (VmHWM: ru_maxrss would include the parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40000, length).tolist()


# ---- engine ------------------------------------------------------------------------------

def engine_weight_bytes(model) -> int:
    """Bytes of the matrices one decode step reads (the embedding gathers a row or two)."""
    seen, total = set(), 0
    weights = [model.lm_head] + [w for layer in model.layers
                                 for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
    for w in weights:
        parts = getattr(w, "parts", [w])
        for p in parts:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.nbytes
    return total


def run_engine(args) -> dict:
    import engine
    from engine import LLM, SamplingParams, ops

    batch = args.batch
    seq_len = (args.prompt_len if batch == 1 else 32) + args.new_tokens + 16
    llm = LLM(args.model, max_model_len=seq_len, skip_tokenizer_init=True,
              enable_prefix_caching=False, max_num_seqs=max(batch, 1),
              num_kv_blocks=batch * (-(-seq_len // 16)) + 1, kv_cache_dtype=args.kv_cache_dtype)
    eng = llm.engine

    def run(prompts, new_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        for i, ids in enumerate(prompts):
            eng.add_request(f"{time.time()}-{i}", {"prompt_token_ids": ids}, params)
        t0 = time.perf_counter()
        eng.step()  # every prompt in one step (<= max_num_batched_tokens)
        t1 = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    run([prompt_ids(32, 99)], 8)  # warm up: first touches of weights and buffers
    if batch == 1:
        prefill, decode = run([prompt_ids(args.prompt_len)], args.new_tokens + 1)
        prefill_tps = args.prompt_len / prefill
        single = {}
    else:
        _, alone = run([prompt_ids(32, batch)], args.new_tokens + 1)
        single = dict(batch1_decode_tps=args.new_tokens / alone)
        prefill, decode = run([prompt_ids(32, s) for s in range(batch)], args.new_tokens + 1)
        prefill_tps = 32 * batch / prefill
    return dict(prefill_tps=prefill_tps, decode_tps=batch * args.new_tokens / decode, **single,
                weight_bytes_per_token=engine_weight_bytes(eng.model),
                versions=f"engine {engine.__version__} (ISA {ops.isa()}, quantised kernels "
                         f"{ops.quant_kernel()}), numpy {np.__version__}, python "
                         f"{platform.python_version()}")


# ---- llama.cpp -----------------------------------------------------------------------------

def run_llama_cpp(args) -> dict:
    import llama_cpp

    n_ctx = args.prompt_len + args.new_tokens + 16
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=n_ctx, n_batch=args.prompt_len,
                          n_ubatch=args.prompt_len, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)

    n_vocab = llm.n_vocab()

    def greedy():  # the logits of the batch's last token (logits_all is off)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def run(ids, new_tokens):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = greedy()
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = greedy()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    run(prompt_ids(32, 99), 8)
    prefill, decode = run(prompt_ids(args.prompt_len), args.new_tokens)
    return dict(prefill_tps=args.prompt_len / prefill, decode_tps=args.new_tokens / decode,
                weight_bytes_per_token=0, versions=f"llama-cpp-python {llama_cpp.__version__}")


# ---- transformers --------------------------------------------------------------------------

def run_transformers(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    ids = torch.tensor([prompt_ids(args.prompt_len)])
    with torch.no_grad():
        model(ids[:, :32])  # warm up
        t0 = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new_tokens + 1, min_new_tokens=args.new_tokens + 1,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
        total = time.perf_counter() - t0
    return dict(prefill_tps=args.prompt_len / prefill, decode_tps=args.new_tokens / (total - prefill),
                weight_bytes_per_token=0,
                versions=f"torch {torch.__version__}, transformers {transformers.__version__} "
                         f"({next(model.parameters()).dtype})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runner", choices=["engine", "llama.cpp", "transformers"])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-cache-dtype", default="float16", help="engine's KV cache")
    args = parser.parse_args()
    run = {"engine": run_engine, "llama.cpp": run_llama_cpp, "transformers": run_transformers}
    result = run[args.runner](args)
    result["peak_rss"] = peak_rss()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
