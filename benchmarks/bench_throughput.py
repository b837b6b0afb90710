"""Offline throughput: the same requests submitted together (one generate call) vs one at a time.

    python benchmarks/bench_throughput.py [--model NAME_OR_PATH] [--num-requests 16]
                                          [--scale 0.125] [--temperature 0.6] [--repeats 2]
                                          [--kv-cache-gib 1.0] [--seed 0]

nano-vllm's bench.py protocol, scaled: random token-id prompts of 100-1024 tokens and
random output lengths of 100-1024 tokens (ignore_eos, so every request generates exactly
its length), both ranges multiplied by --scale so that a 2-core machine finishes in
minutes (nano-vllm itself runs 256 requests at scale 1 on a GPU). Throughput is generated
tokens / wall time. "batched" is one LLM.generate call with the whole list (continuous
batching); "sequential" is one generate call per request. Runs are interleaved (batched,
sequential, batched, ...) because these machines drift, the prefix cache is reset before
each run so that no run reuses another's prompts, and medians are reported. The last line
is the ratio batched / sequential.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

from bench_generate import machine_line


def make_requests(num_requests: int, scale: float, seed: int):
    """nano-vllm's bench.py: lengths uniform in [100, 1024] (scaled), ids in [0, 10000]."""
    rng = np.random.default_rng(seed)
    lo, hi = (max(1, int(x * scale + 0.5)) for x in (100, 1024))  # half up: 12.5 -> 13
    prompts = [rng.integers(0, 10000, rng.integers(lo, hi + 1)).tolist()
               for _ in range(num_requests)]
    output_lens = rng.integers(lo, hi + 1, num_requests).tolist()
    return prompts, output_lens, (lo, hi)


def timed_run(llm, prompts, params, is_batched: bool) -> tuple[float, int]:
    """Wall seconds and generated tokens for all requests, batched or one call each."""
    llm.engine.block_manager.reset_prefix_cache()  # no run reuses another's prompts
    inputs = [{"prompt_token_ids": p} for p in prompts]
    t0 = time.perf_counter()
    if is_batched:
        outputs = llm.generate(inputs, params, use_tqdm=False)
    else:
        outputs = [llm.generate([x], [p], use_tqdm=False)[0] for x, p in zip(inputs, params)]
    seconds = time.perf_counter() - t0
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--scale", type=float, default=0.125,
                        help="multiplies nano-vllm's 100-1024 token ranges")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.scale <= 1 or args.num_requests < 1 or args.repeats < 1:
        parser.error("need 0 < --scale <= 1, --num-requests >= 1 and --repeats >= 1")

    import engine
    from engine import LLM, SamplingParams, ops
    from engine.model.registry import resolve_model_path

    prompts, output_lens, (lo, hi) = make_requests(args.num_requests, args.scale, args.seed)
    params = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=n,
                             seed=args.seed + i) for i, n in enumerate(output_lens)]
    path = resolve_model_path(args.model)
    llm = LLM(path, max_model_len=2 * hi, kv_cache_gib=args.kv_cache_gib)
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(max_tokens=4))  # warm up

    results = {"batched": [], "sequential": []}
    preemptions = {"batched": 0, "sequential": 0}  # the most in one run
    for _ in range(args.repeats):
        for name in results:
            before = llm.engine.scheduler.num_preemptions
            results[name].append(timed_run(llm, prompts, params, name == "batched"))
            preemptions[name] = max(preemptions[name],
                                    llm.engine.scheduler.num_preemptions - before)

    eng = llm.engine
    print(f"machine: {machine_line()}")
    print(f"versions: engine {engine.__version__} (ISA {ops.isa()}), numpy {np.__version__}, "
          f"python {platform.python_version()}")
    print(f"model: {os.path.basename(path)}; KV cache {eng.num_blocks} blocks of "
          f"{eng.config.block_size} tokens, max_model_len {eng.max_model_len}, "
          f"max_num_seqs {eng.config.max_num_seqs}, "
          f"max_num_batched_tokens {eng.config.max_num_batched_tokens}")
    inverse = 1 / args.scale
    scale = f"1/{inverse:.0f}" if abs(inverse - round(inverse)) < 1e-9 else f"{args.scale:g}"
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"nano-vllm protocol at {scale} scale: prompts {lo}-{hi}, outputs {lo}-{hi} "
          f"tokens, {args.num_requests} requests ({sum(map(len, prompts))} prompt tokens, "
          f"{sum(output_lens)} output tokens), ignore_eos, {sampling}; "
          f"interleaved, median of {args.repeats}")
    print(f"{'mode':<12}{'seconds':>10}{'output tok/s':>15}{'preemptions':>13}")
    throughput = {}
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        throughput[name] = statistics.median(n / s for s, n in runs)
        print(f"{name:<12}{seconds:>10.2f}{throughput[name]:>15.1f}{preemptions[name]:>13}")
    print(f"ratio batched/sequential: {throughput['batched'] / throughput['sequential']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
