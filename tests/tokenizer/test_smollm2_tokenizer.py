"""SmolLM2's GGUF tokenizer (byte-level BPE, "smollm" pre-tokenizer) against transformers on the
Hugging Face folder engine writes for it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tokenizer import load_tokenizer

TEXTS = [
    "The capital of France is",
    "1234567 apples cost $3.50, or 12,000.75 in total",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name>x",
    "héllo wörld 你好 🤗 Привет ελληνικά مرحبا",
    "  multiple   spaces\n\n\ttabs\r\n",
    "I've been 'told he's there, 'RE you sure?",
    "def f(x):\n    return x ** 2  # square\n",
    "",
]


@pytest.fixture(scope="module")
def hf_tok(smollm2_hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)


def test_metadata(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_token_id, smollm2.eos_token_id) == (1, 2)
    assert smollm2.eos_token_ids == {2}
    assert {0, 1, 2} <= smollm2.all_special_ids
    assert smollm2.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


def test_capital_of_france(smollm2):
    ids = smollm2.encode("The capital of France is")
    assert smollm2.convert_ids_to_tokens(ids) == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert smollm2.decode(ids) == "The capital of France is"


def test_no_bos_and_digits_split(smollm2):
    ids = smollm2.encode("2024")
    assert len(ids) == 4 and smollm2.decode(ids) == "2024"


def test_special_tokens_in_text(smollm2):
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2.decode(ids) == "user\nHi"
    assert smollm2.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(smollm2, hf_tok, text):
    ids = smollm2.encode(text)
    assert ids == hf_tok.encode(text)
    assert smollm2.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert smollm2.decode(ids, False) == hf_tok.decode(ids, skip_special_tokens=False)


@settings(deadline=None)
@given(st.text(max_size=40))
def test_encode_matches_transformers_random(smollm2, hf_tok, text):
    assert smollm2.encode(text) == hf_tok.encode(text)


def test_written_folder(smollm2, smollm2_hf_dir):
    config = json.loads((smollm2_hf_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["added_tokens_decoder"]["2"]["special"] is True
    again = load_tokenizer(smollm2_hf_dir)
    for text in TEXTS:
        assert again.encode(text) == smollm2.encode(text)
    assert again.chat_template == smollm2.chat_template
    assert (again.bos_token_id, again.eos_token_id) == (1, 2)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 👋"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smollm2, hf_tok, messages, add_generation_prompt):
    ours = smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False,
                                        add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>")
    assert smollm2.encode(ours) == hf_tok.encode(theirs)


def test_ids_outside_vocabulary_ignored(smollm2, llama_spm):
    assert smollm2.decode([504, 49152, 10**6]) == "The"
    assert llama_spm.decode([15043, 32000, -1]) == "Hello"
    assert smollm2.id_to_piece(49152) is None
