"""CPU speed on the same weights: engine vs llama.cpp (llama-cpp-python) vs transformers.

    python benchmarks/bench_cpu.py --setup     # once: build llama-cpp-python 0.3.36 (5-6 min),
                                               # install matplotlib, make the models
    python benchmarks/bench_cpu.py [--repeats 5] [--models smollm2,llama1b] [--threads 2]
    ENGINE_ISA=avx2 ENGINE_BENCH_LLAMA_SITE=DIR python benchmarks/bench_cpu.py --cases ...
                                               # a CPU without AVX-512: see the README

Models: SmolLM2-135M-Instruct from its GGUF (Q4_1 layers, Q8_0 embedding: the bytes llama.cpp
reads), plus f16 and Q8_0 GGUFs that llama.cpp's converter writes from the same weights
dequantised; and a random Llama of 1.07B parameters (hidden 2048, 16 layers, Llama-3.2-1B's
shape with SmolLM2's vocabulary) as bf16 safetensors, converted to GGUF f16 and Q8_0 by the
converter in the llama-cpp-python sdist, and to Q4_0 and Q4_K_M (Q4_K layers, Q6_K for half
the attention V and FFN down and the LM head: the usual GGUF download) by llama.cpp's own
quantiser.

Batch 1 runs engine and llama.cpp in lockstep: two fresh worker processes load their model,
prefill the same 512-token prompt in turns (3 times each, ABBA order), then decode in turns of
about --turn-seconds each (0.25 s, sized from the slower engine's second token: sized from the
first, which is slower, run 5's turns were 2 tokens), ABBA, with a 1 GiB copy timed between
two turns. These machines drift by 30% and more within seconds, so separate runs minutes
apart compare the machine's moods, not the engines; turns compare the engines under the same
mood, and the copies give the bandwidth roofline of those same seconds. Each of --repeats
such pairs is a fresh pair of processes (so peak RSS is each one's own); medians are printed,
then ratios engine / llama.cpp. Same threads, same prompt, 128 greedy new tokens.
llama-cpp-python is built with AMX off (GCC 12 miscompiles its _tile_loadconfig); it and the
models live in ~/.cache/engine-bench (ENGINE_BENCH_DIR), never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_cpu_setup as setup  # noqa: E402

PEERS = ("engine", "llama.cpp")


def worker_cmd(runner: str, model: str, threads: int, args, batch: int = 1) -> list[str]:
    return [sys.executable, str(Path(__file__).parent / "bench_cpu_worker.py"), runner, model,
            "--threads", str(threads), "--prompt-len", str(args.prompt_len),
            "--new-tokens", str(args.new_tokens if batch == 1 else args.batch_new_tokens),
            "--batch", str(batch), "--kv-cache-dtype", args.kv_cache_dtype]


def worker_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=setup.pythonpath())


def run_worker(runner: str, model: str, threads: int, args, batch: int = 1) -> dict:
    """One measurement in a fresh process; returns its JSON result."""
    done = subprocess.run(worker_cmd(runner, model, threads, args, batch), env=worker_env(threads),
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{runner} on {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


class Lockstep:
    """A --lockstep worker: loaded and warmed up, it prefills or decodes when told."""

    def __init__(self, runner: str, model: str, threads: int, args):
        self.name = runner
        # stderr to a file: a pipe nobody reads while the worker runs could fill and stall it
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(worker_cmd(runner, model, threads, args) + ["--lockstep"],
                                     env=worker_env(threads), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.reply()  # {"ready": true}: loaded and warmed up

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        while line and not line.startswith("{"):
            line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            self.log.seek(0)
            raise SystemExit(f"{self.name} lockstep worker failed:\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def tell(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def end(self) -> dict:
        result = self.tell("end")
        self.proc.wait(timeout=600)
        return result


def copy_probe(buffers: tuple[np.ndarray, np.ndarray], threads: int) -> tuple[int, float]:
    """(bytes, seconds) of one copy, read + written: a sample of the bandwidth right now."""
    src, dst = buffers
    t0 = time.perf_counter()
    setup.parallel_copy(dst, src, threads)
    return 2 * src.nbytes, time.perf_counter() - t0


def read_probe(buffers: tuple[np.ndarray, np.ndarray], threads: int) -> tuple[int, float]:
    """(bytes, seconds) of one read of 1 GiB: what the threads can read at all right now,
    the ceiling of a decode that reads its weights and writes next to nothing."""
    src = buffers[1]  # the copy's destination: not the bytes the copy just read
    t0 = time.perf_counter()
    setup.parallel_read(src, threads)
    return src.nbytes, time.perf_counter() - t0


def lockstep(case: dict, args) -> dict:
    """engine and llama.cpp in turns (ABBA order): --prefills prefills each, then batch-1
    decode in turns of about --turn-seconds, with a copy-bandwidth sample between two turns.
    All see the same seconds of the machine. Returns each runner's result (prefill and decode
    tok/s over its turns), the decode turns and the copy rate between them."""
    workers = [Lockstep(runner, case[runner], args.threads, args) for runner in PEERS]

    def abba(index: int) -> list[Lockstep]:  # who goes first alternates from turn to turn
        return workers if index % 2 == 0 else workers[::-1]

    for i in range(args.prefills):
        for w in abba(i):
            w.tell("prefill")
    for w in workers:  # the first token after a prefill is slower than the rest
        w.tell("1")
    step = max(w.tell("1")["seconds"] for w in workers)  # the slower engine's warm token
    steps = max(1, round(args.turn_seconds / step))
    left, decode_turns, copies, reads = args.new_tokens - 2, [], [], []
    buffers = (np.ones(1 << 30, np.uint8), np.ones(1 << 30, np.uint8))  # as copy_bandwidth
    while left > 0:
        n = min(steps, left)
        order = abba(len(decode_turns))
        turn = {order[0].name: order[0].tell(str(n))["seconds"]}
        copies.append(copy_probe(buffers, args.threads))
        reads.append(read_probe(buffers, args.threads))
        turn[order[1].name] = order[1].tell(str(n))["seconds"]
        decode_turns.append(dict(tokens=n, **turn))
        left -= n
    results = {w.name: w.end() for w in workers}
    copy_rate = sum(b for b, _ in copies) / sum(s for _, s in copies)
    read_rate = sum(b for b, _ in reads) / sum(s for _, s in reads)
    return dict(results=results, turns=decode_turns, copy_bandwidth=copy_rate,
                read_bandwidth=read_rate)


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def measure(args) -> dict:
    cases = setup.cases(args.models.split(","))
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",")]
        unknown = [c for c in wanted if c not in cases]
        if unknown:
            raise SystemExit(f"--cases: unknown {unknown}; the cases are {list(cases)}")
        cases = {name: cases[name] for name in wanted}
    results: dict = {"cases": {}, "lockstep": {}, "batched": {}, "bandwidth": []}
    results["bandwidth"].append(setup.copy_bandwidth(args.threads))
    for repeat in range(args.repeats):
        for name, case in cases.items():
            pair = lockstep(case, args)
            results["lockstep"].setdefault(name, []).append(
                dict(turns=pair["turns"], copy_bandwidth=pair["copy_bandwidth"],
                     read_bandwidth=pair["read_bandwidth"]))
            for runner, out in pair["results"].items():
                results["cases"].setdefault(name, {}).setdefault(runner, []).append(out)
                print(f"[{repeat + 1}/{args.repeats}] {name:16s} {runner:12s} prefill "
                      f"{out['prefill_tps']:8.1f}  decode {out['decode_tps']:7.2f} tok/s  "
                      f"rss {out['peak_rss'] / 2**20:7.0f} MiB", flush=True)
            print(f"[{repeat + 1}/{args.repeats}] {name:16s} {len(pair['turns'])} turns each, copy "
                  f"{pair['copy_bandwidth'] / 1e9:.1f} GB/s, read "
                  f"{pair['read_bandwidth'] / 1e9:.1f} GB/s between them", flush=True)
            peer = case.get("transformers")
            if peer and not args.no_transformers and repeat < args.peer_repeats:
                out = run_worker("transformers", peer, args.threads, args)
                results["cases"][name].setdefault("transformers", []).append(out)
                print(f"[{repeat + 1}/{args.repeats}] {name:16s} transformers prefill "
                      f"{out['prefill_tps']:8.1f}  decode {out['decode_tps']:7.2f} tok/s",
                      flush=True)
    for name, case in cases.items():
        if not case.get("batched"):
            continue
        for batch in args.batches:
            runs = [run_worker("engine", case["engine"], args.threads, args, batch)
                    for _ in range(args.batch_repeats)]
            results["batched"].setdefault(name, {})[batch] = runs
            ratios = ", ".join(f"{r['paired_ratio']:.2f}" for r in runs)
            print(f"{name:16s} engine batch {batch:3d}: decode "
                  f"{median(runs, 'decode_tps'):8.1f} tok/s (x batch 1 per run: {ratios})",
                  flush=True)
    results["bandwidth"].append(setup.copy_bandwidth(args.threads))
    return results


def report(results: dict, args) -> None:
    bandwidth = max(b for b in results["bandwidth"])
    has_reads = any("read_bandwidth" in run for runs in results.get("lockstep", {}).values()
                    for run in runs)  # runs before 9 timed only the copy
    first = next(iter(next(iter(results["cases"].values())).values()))[0]
    print()
    print(f"machine: {setup.machine_line()}")
    print(f"versions: {first['versions']}, llama-cpp-python {setup.llama_cpp_version()}")
    print(f"{args.threads} threads; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"greedy, batch 1, median of {args.repeats} runs (fresh processes each); engine and "
          f"llama.cpp prefill ({args.prefills} each) and decode (~{args.turn_seconds} s each) "
          f"in turns, ABBA, "
          f"a 1 GiB copy{' and a 1 GiB read' if has_reads else ''} timed between two decode "
          f"turns; "
          f"KV cache: engine {args.kv_cache_dtype}, llama.cpp f16 (its default)")
    print(f"copy bandwidth (read + write), {args.threads} threads, best of 3 at the start and "
          f"end: {bandwidth / 1e9:.1f} GB/s; between the decode turns (median over runs) "
          f"the roofline column" + ("s (read: the same threads reading alone, "
                                    "np.bitwise_or.reduce)" if has_reads else ""))
    header = (f"{'model':16s}{'runner':14s}{'prefill tok/s':>14s}{'decode tok/s':>14s}"
              f"{'peak RSS MiB':>14s}{'weights GB/s':>14s}{'copy GB/s':>11s}{'read GB/s':>11s}")
    print(header)
    ratio_lines = []
    for name, by_runner in results["cases"].items():
        row = {}
        weight_bytes = by_runner["engine"][0]["weight_bytes_per_token"]  # the same weights
        pairs = results.get("lockstep", {}).get(name, [])
        copies = [run["copy_bandwidth"] for run in pairs]
        copy = statistics.median(copies) if copies else bandwidth
        reads = [run["read_bandwidth"] for run in pairs if "read_bandwidth" in run]
        read = statistics.median(reads) if reads else float("nan")
        for runner, runs in by_runner.items():
            prefill, decode = median(runs, "prefill_tps"), median(runs, "decode_tps")
            rss = median(runs, "peak_rss")
            gbps = decode * weight_bytes / 1e9 if runner != "transformers" else float("nan")
            row[runner] = (prefill, decode, rss, gbps)
            print(f"{name:16s}{runner:14s}{prefill:14.1f}{decode:14.2f}{rss / 2**20:14.0f}"
                  f"{gbps:14.1f}{copy / 1e9:11.1f}{read / 1e9:11.1f}")
        if "llama.cpp" in row:
            e, l = row["engine"], row["llama.cpp"]
            # each run's engine against the llama.cpp that decoded in turns with it
            paired = statistics.median(a["decode_tps"] / b["decode_tps"]
                                       for a, b in zip(by_runner["engine"], by_runner["llama.cpp"]))
            if copies:  # each run's weight rate against the copies timed between its turns
                roof = [statistics.median(run["decode_tps"] * weight_bytes / c
                                          for run, c in zip(by_runner[runner], copies))
                        for runner in ("engine", "llama.cpp")]
            else:
                roof = [e[3] * 1e9 / bandwidth, l[3] * 1e9 / bandwidth]
            of_read = ""
            if reads and len(reads) == len(copies):  # the same, against the reads
                fr = [statistics.median(run["decode_tps"] * weight_bytes / r
                                        for run, r in zip(by_runner[runner], reads))
                      for runner in ("engine", "llama.cpp")]
                of_read = f"; {fr[0]:.0%} and {fr[1]:.0%} of the read bandwidth"
            ratio_lines.append(f"{name:16s} engine/llama.cpp: prefill {e[0] / l[0]:.2f}x, decode "
                               f"{e[1] / l[1]:.2f}x (paired runs: {paired:.2f}x), peak RSS "
                               f"{e[2] / l[2]:.2f}x; decode reads weights at {roof[0]:.0%} "
                               f"(engine), {roof[1]:.0%} (llama.cpp) of the copy bandwidth"
                               f"{of_read}")
    for name, by_batch in results["batched"].items():
        for batch, runs in sorted(by_batch.items()):
            tps = median(runs, "decode_tps")
            paired = statistics.median(
                r.get("paired_ratio", r["decode_tps"] / r["batch1_decode_tps"]) for r in runs)
            ratio_lines.append(f"{name:16s} engine batched decode, {batch} sequences: {tps:.1f} "
                               f"tok/s = {paired:.1f}x batch 1 (median of {len(runs)} runs, each "
                               f"the median of its rounds against one sequence decoded just "
                               f"before in its process)")
    print()
    for line in ratio_lines:
        print(line)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["batched"])
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(6 * max(1, len(names)), 4.5))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        by_runner = results["cases"][name]
        batches = [1] + sorted(results["batched"][name])
        tps = [median(by_runner["engine"], "decode_tps")] + [
            median(results["batched"][name][b], "decode_tps") for b in batches[1:]]
        ax.plot(batches, tps, "o-", label="engine")
        for runner, marker in (("llama.cpp", "s"), ("transformers", "^")):
            if runner in by_runner:
                ax.plot([1], [median(by_runner[runner], "decode_tps")], marker, markersize=9,
                        label=f"{runner} (batch 1)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("sequences decoded together")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"decode throughput, {setup.machine_line()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="build llama-cpp-python, make models")
    parser.add_argument("--models", default="smollm2,llama1b")
    parser.add_argument("--cases", help='only these of the models\' cases, e.g. '
                        '"smollm2 q4_1,llama1b q4_0"')
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefills", type=int, default=3,
                        help="prefills of the prompt per engine and pair, in turns")
    parser.add_argument("--turn-seconds", type=float, default=0.25,
                        help="length of a batch-1 decode turn in lockstep")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-repeats", type=int, default=1, help="transformers runs per case")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--batch-new-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-dtype", default="float16",
                        help="engine's KV cache (llama.cpp stores f16 by default)")
    parser.add_argument("--batch-repeats", type=int, default=3)
    parser.add_argument("--json", default="bench_cpu.json", help="raw results")
    parser.add_argument("--plot", default="bench_cpu.png")
    parser.add_argument("--report", metavar="JSON", help="print the report of a saved run")
    args = parser.parse_args()
    if args.setup:
        setup.run_setup()
        return 0
    started = time.time()
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        results["batched"] = {name: {int(b): runs for b, runs in by_batch.items()}
                              for name, by_batch in results["batched"].items()}
    else:
        setup.require_setup()
        results = measure(args)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    report(results, args)
    if results["batched"]:
        plot(results, args.plot)
    print(f"({time.time() - started:.0f} s; platform {platform.platform()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
