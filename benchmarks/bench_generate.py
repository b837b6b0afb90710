"""Prefill and decode tokens/s for SmolLM2-135M-Instruct on this machine.

    python benchmarks/bench_generate.py [--model PATH] [--prompt-len 512] [--new-tokens 128]
                                        [--repeats 5] [--no-transformers]

engine runs the model from its GGUF (dequantised to float32 at load); the peer,
transformers (torch CPU, float32), runs the folder `engine convert` writes from
the same file, so both compute on the same weights. Runs are interleaved
(engine, peer, engine, peer, ...) because these machines drift; medians are
reported, and the last lines are ratios engine / peer.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def machine_line() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def time_engine(llm, prompt_ids, new_tokens):
    """Prefill: the first step (the whole prompt); decode: every step after it."""
    from engine import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True)
    eng.add_request("bench", {"prompt_token_ids": prompt_ids}, params)
    t0 = time.perf_counter()
    eng.step()
    t1 = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    t2 = time.perf_counter()
    return len(prompt_ids) / (t1 - t0), new_tokens / (t2 - t1)


def time_transformers(model, torch, prompt_ids, new_tokens):
    """Prefill: one forward over the prompt; decode: generate's time less that forward."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
        total = time.perf_counter() - t0
    return len(prompt_ids) / prefill, new_tokens / (total - prefill)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    import engine
    from engine import LLM, ops
    from engine.model.registry import resolve_model_path

    path = resolve_model_path(args.model)
    # the same prompt runs repeatedly: without this the prefix cache would skip its prefill
    llm = LLM(path, max_model_len=args.prompt_len + args.new_tokens + 32,
              enable_prefix_caching=False)
    vocab = llm.engine.model_config.vocab_size
    prompt_ids = np.random.default_rng(0).integers(100, vocab, args.prompt_len).tolist()

    peer = None
    if not args.no_transformers:
        import torch
        import transformers
        from engine.model.convert import convert_gguf

        torch.set_num_threads(args.threads)
        folder = path
        if path.endswith(".gguf"):
            folder = tempfile.mkdtemp(prefix="bench-hf-")
            convert_gguf(path, folder)
        peer = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    time_engine(llm, prompt_ids, 8)  # warm up
    results = {"engine": [], "transformers": []}
    for _ in range(args.repeats):
        results["engine"].append(time_engine(llm, prompt_ids, args.new_tokens))
        if peer is not None:
            results["transformers"].append(time_transformers(peer, torch, prompt_ids,
                                                             args.new_tokens))

    print(f"machine: {machine_line()}")
    versions = f"engine {engine.__version__} (ISA {ops.isa()}), numpy {np.__version__}, " \
               f"python {platform.python_version()}"
    if peer is not None:
        versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"versions: {versions}")
    print(f"model: {os.path.basename(path)}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, batch 1, greedy, median of {args.repeats}")
    print(f"{'runner':<14}{'prefill tok/s':>16}{'decode tok/s':>16}")
    medians = {}
    for name, runs in results.items():
        if runs:
            medians[name] = (statistics.median(r[0] for r in runs),
                             statistics.median(r[1] for r in runs))
            print(f"{name:<14}{medians[name][0]:>16.1f}{medians[name][1]:>16.1f}")
    if "transformers" in medians:
        e, t = medians["engine"], medians["transformers"]
        print(f"ratio engine/transformers: prefill {e[0] / t[0]:.2f}x, decode {e[1] / t[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
