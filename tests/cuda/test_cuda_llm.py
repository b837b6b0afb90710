"""The whole model on the GPU: the same greedy tokens as the CPU path, graphs the same
as eager steps, seeded sampling reproducible."""

import os

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.cli import main as cli_main
from engine.ops import gpu_available

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="no GPU: CUDA kernels run only on a machine with an NVIDIA GPU")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 32


def make_llama(path, dtype):
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


def run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


PROMPTS = [list(range(3, 70)), [5, 9, 11], list(range(100, 117)), [7] * 40, [42]]


@pytest.mark.parametrize("dtype,kv,tol", [("float32", "float32", 1e-3),
                                          ("bfloat16", "float32", 2e-2),
                                          ("bfloat16", "bfloat16", 3e-2)])
def test_tiny_llama_on_cuda_matches_the_cpu(tmp_path, dtype, kv, tol):
    make_llama(tmp_path, getattr(torch, dtype))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    cpu = LLM(str(tmp_path), skip_tokenizer_init=True)
    gpu = LLM(str(tmp_path), skip_tokenizer_init=True, device="cuda", kv_cache_dtype=kv)
    want = run(cpu, PROMPTS[:1], params)
    got = run(gpu, PROMPTS[:1], params)
    if dtype == "float32":
        assert got == want
    else:  # bf16 activations in the tensor-core prefill: compare until the first divergence
        same = next((i for i, (a, b) in enumerate(zip(got[0], want[0])) if a != b), NEW_TOKENS)
        assert same >= 8, f"tokens diverge at step {same}: {got[0]} vs {want[0]}"
    # teacher-forced logits: score the CPU's tokens on both devices, one prefill each
    seq = PROMPTS[0] + want[0]
    lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    c = cpu.generate({"prompt_token_ids": seq}, lp, use_tqdm=False)[0].prompt_logprobs
    g = gpu.generate({"prompt_token_ids": seq}, lp, use_tqdm=False)[0].prompt_logprobs
    cl = np.array([list(d.values())[0] for d in c[1:]])
    gl = np.array([list(d.values())[0] for d in g[1:]])
    assert np.abs(cl - gl).max() <= tol * max(1.0, np.abs(cl).max()), np.abs(cl - gl).max()


def test_graphs_give_the_same_tokens_as_eager_steps(tmp_path):
    make_llama(tmp_path, torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    graphs = LLM(str(tmp_path), skip_tokenizer_init=True, device="cuda")
    assert graphs.engine.runner.cuda_steps.graphs, "no CUDA graphs were captured"
    eager = LLM(str(tmp_path), skip_tokenizer_init=True, device="cuda", use_cuda_graphs=False)
    a = run(graphs, PROMPTS, params)
    b = run(eager, PROMPTS, params)
    assert a == b


def test_programmatic_launch_gives_the_same_tokens_as_plain_launches(tmp_path):
    from engine import _C_cuda

    before = _C_cuda.programmatic_launch()
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert before == (hopper and os.environ.get("ENGINE_CUDA_PDL") != "0")
    make_llama(tmp_path, torch.bfloat16)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        _C_cuda.set_programmatic_launch(True)
        assert _C_cuda.programmatic_launch() == hopper
        on = run(LLM(str(tmp_path), skip_tokenizer_init=True, device="cuda"), PROMPTS, params)
        _C_cuda.set_programmatic_launch(False)
        assert not _C_cuda.programmatic_launch()
        off = run(LLM(str(tmp_path), skip_tokenizer_init=True, device="cuda"), PROMPTS, params)
    finally:
        _C_cuda.set_programmatic_launch(before)
    assert on == off


def test_seeded_sampling_on_cuda_is_reproducible_and_n_forks(tmp_path):
    # Prefix caching off: a cached prompt would run its last token through other kernels
    # (the GPU kernels are deterministic, but not invariant to how a batch is split).
    make_llama(tmp_path, torch.bfloat16)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, device="cuda",
              enable_prefix_caching=False)
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=20,
                       ignore_eos=True, presence_penalty=0.5, logit_bias={5: 3.0})
    first = llm.generate({"prompt_token_ids": PROMPTS[0]}, p, use_tqdm=False)[0].outputs[0]
    again = llm.generate({"prompt_token_ids": PROMPTS[0]}, p, use_tqdm=False)[0].outputs[0]
    assert first.token_ids == again.token_ids
    other = SamplingParams(temperature=0.9, seed=8, max_tokens=20, ignore_eos=True)
    assert llm.generate({"prompt_token_ids": PROMPTS[0]}, other,
                        use_tqdm=False)[0].outputs[0].token_ids != first.token_ids
    n4 = SamplingParams(temperature=1.0, n=4, seed=3, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = llm.generate({"prompt_token_ids": PROMPTS[2]}, n4, use_tqdm=False)[0].outputs
    assert len(outs) == 4 and all(len(o.token_ids) == 12 for o in outs)
    assert all(len(o.logprobs) == 12 for o in outs)


def test_smollm2_greedy_tokens_on_cuda_equal_the_cpu(smollm2_gguf, tmp_path):
    """The GPU has no block kernels: it runs the GGUF's Q4_1 / Q8_0 blocks dequantised to
    float32. The CPU path on those float32 weights (`engine convert`'s folder) must give the
    same greedy tokens, and the same teacher-forced logprobs within float32 rounding. (The
    CPU's own Q4_1 path quantises activations to q8 blocks as llama.cpp does, which moves
    logits by up to ~1.5: tests/model/test_smollm2.py bounds that against float32.)"""
    folder = tmp_path / "smollm2-f32"
    assert cli_main(["convert", smollm2_gguf, str(folder)]) == 0
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a land far away,", "The three primary colors are"]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    cpu_llm = LLM(str(folder), max_model_len=512)
    gpu_llm = LLM(smollm2_gguf, max_model_len=512, device="cuda")
    cpu = cpu_llm.generate(prompts, params, use_tqdm=False)
    gpu = gpu_llm.generate(prompts, params, use_tqdm=False)
    worst = 0.0
    for c, g in zip(cpu, gpu):
        assert g.prompt_token_ids == c.prompt_token_ids
        assert g.outputs[0].token_ids == c.outputs[0].token_ids, (c.outputs[0].text,
                                                                  g.outputs[0].text)
        seq = c.prompt_token_ids + c.outputs[0].token_ids
        lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        cl, gl = (np.array([next(iter(d.values())) for d in
                            llm.generate({"prompt_token_ids": seq}, lp,
                                         use_tqdm=False)[0].prompt_logprobs[1:]])
                  for llm in (cpu_llm, gpu_llm))
        worst = max(worst, float(np.abs(cl - gl).max()))
    print(f"SmolLM2 on cuda: {len(prompts)} prompts x {NEW_TOKENS} greedy tokens identical to "
          f"the CPU; teacher-forced logprobs differ by at most {worst:.2e}")
    assert worst <= 1e-2
    assert "Paris" in gpu[0].outputs[0].text
