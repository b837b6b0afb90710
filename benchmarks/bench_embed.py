"""Sentences/s embedding all-MiniLM-L6-v2: engine against sentence-transformers (torch CPU).

    python benchmarks/bench_embed.py [--sentences 10000] [--repeats 3] [--threads 2]
                                     [--st-batch-size 32] [--max-num-batched-tokens 4096]

The workload: seeded random sentences of mixed length built from the model's own
vocabulary (70% of 3-25 words, 25% of 25-80, 5% of 80-350, so some pass the 256-token
limit and are truncated by both). Each run embeds all of them end to end, tokenization
included: engine through `LLM.embed(truncate=True)`, sentence-transformers through
`SentenceTransformer.encode` (its defaults: batches of 32 sorted by length, padded per
batch). Both use the same number of threads. Runs are interleaved (engine, peer, engine,
...) because these machines drift; medians are reported, and the last lines are ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

MODEL = "all-MiniLM-L6-v2"


def machine_line() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def make_sentences(folder: str, count: int, seed: int = 0) -> list[str]:
    """Seeded sentences of mixed length from the model's whole-word vocabulary."""
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        words = [w for w in f.read().split("\n") if w.isalpha() and w.isascii() and len(w) > 1]
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=count, p=[0.70, 0.25, 0.05])
    low, high = np.array([3, 25, 80]), np.array([25, 80, 350])
    lengths = rng.integers(low[kind], high[kind] + 1)
    ends = np.array([".", "!", "?", ""])
    return [" ".join(rng.choice(words, n)).capitalize() + rng.choice(ends) for n in lengths]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--st-batch-size", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before engine._C starts OpenMP
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sentence_transformers
    import torch
    import transformers

    import engine
    from engine import LLM, ops
    from engine.model.registry import resolve_model_path

    torch.set_num_threads(args.threads)
    folder = resolve_model_path(MODEL)
    sentences = make_sentences(folder, args.sentences)
    llm = LLM(MODEL, max_num_batched_tokens=args.max_num_batched_tokens)
    peer = sentence_transformers.SentenceTransformer(folder, device="cpu")
    lengths = np.array([len(llm.get_tokenizer().encode(s)) for s in sentences])  # untruncated

    def run_engine():
        return llm.embed(sentences, truncate=True)

    def run_peer():
        return peer.encode(sentences, batch_size=args.st_batch_size, convert_to_numpy=True)

    llm.embed(sentences[:200], truncate=True)  # warm up both
    peer.encode(sentences[:200], batch_size=args.st_batch_size)
    times = {"engine": [], "sentence-transformers": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in (("engine", run_engine), ("sentence-transformers", run_peer)):
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    a, b = outputs["engine"], outputs["sentence-transformers"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    print(f"machine: {machine_line()}")
    print(f"versions: engine {engine.__version__} (ISA {ops.isa()}), numpy {np.__version__}, "
          f"python {platform.python_version()}, torch {torch.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}, "
          f"transformers {transformers.__version__}")
    used = np.minimum(lengths, llm.embedder.max_input_len)
    print(f"workload: {MODEL}, {len(sentences)} sentences, {lengths.min()}-{lengths.max()} tokens "
          f"(median {int(np.median(lengths))}, mean {lengths.mean():.1f}; "
          f"{int((lengths > 256).sum())} truncated to 256), {int(used.sum())} tokens in all; "
          f"{args.threads} threads; engine token budget {args.max_num_batched_tokens}, "
          f"sentence-transformers batch {args.st_batch_size}; median of {args.repeats} "
          f"interleaved runs")
    print(f"agreement: min cosine engine vs sentence-transformers {cosine.min():.7f}")
    print(f"{'runner':<24}{'seconds':>10}{'sentences/s':>14}{'tokens/s':>12}   every run (s)")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in medians.items():
        runs = ", ".join(f"{x:.1f}" for x in times[name])
        print(f"{name:<24}{t:>10.2f}{len(sentences) / t:>14.1f}{used.sum() / t:>12.0f}   {runs}")
    ratio = medians["sentence-transformers"] / medians["engine"]
    print(f"ratio engine/sentence-transformers: {ratio:.2f}x sentences/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
