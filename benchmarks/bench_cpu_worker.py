"""One bench_cpu measurement in a fresh process: prints a JSON line.

    python benchmarks/bench_cpu_worker.py {engine,llama.cpp,transformers} MODEL
        [--threads 2] [--prompt-len 512] [--new-tokens 128] [--batch 1]
        [--kv-cache-dtype float16] [--lockstep] [--rounds 3]

batch 1: prefill tok/s (one step over the whole prompt) and decode tok/s (every token after
the first). batch N (engine only): N sequences of 32-token prompts, decode tok/s over the
steps after their prefill, and just before, in the same process, one such sequence alone
(batch1_decode_tps), in --rounds turns (default 3): medians, and the median of the rounds'
ratios (paired_ratio), so that drift moves one round's pair, not the result.
Peak RSS is this process's (ru_maxrss).

--lockstep (engine, llama.cpp; batch 1): after the warm-up the worker prints {"ready": true}
and then works on command, one line on stdin each: "prefill" starts the prompt afresh (any
earlier one is dropped) and answers {"seconds": ...}; "N" decodes N tokens of the latest
prompt and answers the same; "end" prints the final result (prefill tok/s over every
prefill, decode tok/s over every decoded token). bench_cpu.py drives two such workers in
turn, so that both engines run through the same seconds of a drifting machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
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


class EngineRunner:
    """engine's offline engine, stepped by hand: one step() is the prefill or one token."""

    def __init__(self, args):
        import engine
        from engine import LLM, ops

        batch = args.batch
        seq_len = (args.prompt_len if batch == 1 else 32) + args.new_tokens + 16
        llm = LLM(args.model, max_model_len=seq_len, skip_tokenizer_init=True,
                  enable_prefix_caching=False, max_num_seqs=max(batch, 1),
                  num_kv_blocks=batch * (-(-seq_len // 16)) + 1,
                  kv_cache_dtype=args.kv_cache_dtype)
        self.eng = llm.engine
        self.requests: list[str] = []
        self.info = dict(
            weight_bytes_per_token=engine_weight_bytes(self.eng.model),
            versions=f"engine {engine.__version__} (ISA {ops.isa()}, quantised kernels "
                     f"{ops.quant_kernel()}), numpy {np.__version__}, python "
                     f"{platform.python_version()}")

    def start(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Adds the prompts (new_tokens to decode after the prefill's), dropping any earlier
        ones; times the prefill."""
        from engine import SamplingParams

        for request_id in self.requests:
            self.eng.abort_request(request_id)
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True)
        self.requests = [f"{time.time()}-{i}" for i in range(len(prompts))]
        for request_id, ids in zip(self.requests, prompts):
            self.eng.add_request(request_id, {"prompt_token_ids": ids}, params)
        t0 = time.perf_counter()
        self.eng.step()  # every prompt in one step (<= max_num_batched_tokens)
        return time.perf_counter() - t0

    def decode(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.eng.step()
        return time.perf_counter() - t0

    def finish(self) -> None:
        while self.eng.has_unfinished_requests():
            self.eng.step()
        self.requests = []


# ---- llama.cpp -----------------------------------------------------------------------------

class LlamaCppRunner:
    """llama-cpp-python's low-level loop: eval the prompt, then one token at a time."""

    def __init__(self, args):
        import llama_cpp

        n_ctx = args.prompt_len + args.new_tokens + 16
        self.llm = llama_cpp.Llama(model_path=args.model, n_ctx=n_ctx, n_batch=args.prompt_len,
                                   n_ubatch=args.prompt_len, n_threads=args.threads,
                                   n_threads_batch=args.threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.token = 0
        self.info = dict(weight_bytes_per_token=0,
                         versions=f"llama-cpp-python {llama_cpp.__version__}")

    def greedy(self) -> int:  # the logits of the batch's last token (logits_all is off)
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def start(self, prompts: list[list[int]], new_tokens: int) -> float:
        (ids,) = prompts
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        self.token = self.greedy()
        return time.perf_counter() - t0

    def decode(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([self.token])
            self.token = self.greedy()
        return time.perf_counter() - t0

    def finish(self) -> None:
        pass


def run_batch1(runner, args) -> dict:
    runner.start([prompt_ids(32, 99)], 8)  # warm up: first touches of weights and buffers
    runner.decode(8)
    runner.finish()
    prompt = [prompt_ids(args.prompt_len)]
    if not args.lockstep:
        prefill_s, prefills = runner.start(prompt, args.new_tokens), 1
        decode_s, tokens = runner.decode(args.new_tokens), args.new_tokens
    else:
        print(json.dumps(dict(ready=True)), flush=True)
        prefill_s = decode_s = 0.0
        prefills = tokens = 0
        for line in sys.stdin:
            command = line.strip()
            if command == "end":
                break
            if command == "prefill":
                seconds = runner.start(prompt, args.new_tokens)
                prefill_s, prefills = prefill_s + seconds, prefills + 1
            else:
                seconds = runner.decode(int(command))
                decode_s, tokens = decode_s + seconds, tokens + int(command)
            print(json.dumps(dict(seconds=seconds)), flush=True)
    runner.finish()
    return dict(prefill_tps=prefills * args.prompt_len / prefill_s, decode_tps=tokens / decode_s,
                **runner.info)


def run_engine_batched(runner, args) -> dict:
    """N sequences decoded together, against one sequence alone just before, --rounds times in
    turn (alone, together, alone, together, ...): the figures are medians over the rounds, and
    the ratio is the median of each round's together / alone, so that a minute of drift on
    this shared machine moves one round's pair, not the result."""
    batch, n = args.batch, args.new_tokens
    runner.start([prompt_ids(32, 99)], 8)
    runner.finish()
    alone, together, prefill = [], [], []
    for _ in range(args.rounds):
        runner.start([prompt_ids(32, batch)], n)
        alone.append(n / runner.decode(n))
        runner.finish()
        prefill.append(32 * batch / runner.start([prompt_ids(32, s) for s in range(batch)], n))
        together.append(batch * n / runner.decode(n))
        runner.finish()
    median = statistics.median
    return dict(prefill_tps=median(prefill), decode_tps=median(together),
                batch1_decode_tps=median(alone),
                paired_ratio=median(t / a for t, a in zip(together, alone)),
                rounds=dict(alone=alone, together=together), **runner.info)


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
    parser.add_argument("--lockstep", action="store_true", help="decode on stdin's commands")
    parser.add_argument("--rounds", type=int, default=3, help="batch N: alone/together rounds")
    args = parser.parse_args()
    if args.runner == "transformers":
        result = run_transformers(args)
    else:
        if args.batch > 1 and args.runner != "engine":
            parser.error("--batch > 1 runs engine only")
        runner = (EngineRunner if args.runner == "engine" else LlamaCppRunner)(args)
        result = run_batch1(runner, args) if args.batch == 1 else run_engine_batched(runner, args)
    result["peak_rss"] = peak_rss()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
