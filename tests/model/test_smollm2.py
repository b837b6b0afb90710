"""SmolLM2-135M-Instruct from its GGUF (dequantised to float32) against transformers run on
the folder `engine convert` writes from the same file."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine import LLM, SamplingParams  # noqa: E402
from engine.cli import main as cli_main  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "Water boils at a temperature of 100 degrees",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_gguf):
    out = tmp_path_factory.mktemp("smollm2-hf")
    assert cli_main(["convert", smollm2_gguf, str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(smollm2_gguf, max_model_len=512)


def test_greedy_tokens_match_transformers_on_the_converted_folder(llm, converted):
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, prompt


def test_capital_of_france_is_paris(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text
