"""A folder with only Mistral-7B's tokenizer.model (SentencePiece BPE, byte fallback), and
folders with Hugging Face config files beside it."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.tokenizer import load_tokenizer

SCRIPTS = [
    "Crème brûlée à la façon de Zoë, naïve café",
    "Привет, как дела? Съешь же ещё этих мягких булок",
    "Καλημέρα κόσμε, ξεσκεπάζω την ψυχοφθόρα βδελυγμία",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "🤗🚀👨‍👩‍👧 🦙 ✨",
    "def f(x):\n    return {'a': x ** 2}  # ok\n",
    "a  b   c\t\td\n\n e ",
    " leading space",
    "trailing spaces  ",
    "\u200b\ufeffzero width",
]


@pytest.mark.parametrize("text", SCRIPTS)
def test_round_trip(mistral, text):
    ids = mistral.encode(text)
    assert ids[0] == mistral.bos_token_id == 1
    assert mistral.decode(ids) == text
    assert mistral.decode(mistral.encode(text, add_special_tokens=False)) == text


def test_defaults(mistral):
    assert mistral.vocab_size == 32000
    assert (mistral.bos_token_id, mistral.eos_token_id) == (1, 2)
    assert mistral.all_special_ids == {0, 1, 2}
    assert mistral.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        mistral.apply_chat_template([{"role": "user", "content": "hi"}])


def test_control_tokens_split_out(mistral):
    ids = mistral.encode("<s>[INST] Hi [/INST] Hello</s>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert mistral.decode(ids) == "[INST] Hi [/INST] Hello"
    assert mistral.decode(ids, skip_special_tokens=False) == "<s>[INST] Hi [/INST] Hello</s>"


def test_byte_fallback_pieces(mistral):
    ids = mistral.encode("🦙", add_special_tokens=False)
    assert any(mistral.id_to_piece(i).startswith("<0x") for i in ids)


def test_config_files(mistral, mistral_dir, tmp_path):
    shutil.copy(mistral_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": True,
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]"
                         "{{ m['content'] }}{{ eos_token }}{% endfor %}",
        "added_tokens_decoder": {"32000": {"content": "<|tool|>", "special": True}},
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 32000]}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hi") == mistral.encode("Hi", add_special_tokens=False) + [2]
    assert tok.eos_token_ids == {2, 32000}
    assert tok.vocab_size == 32001
    assert tok.encode("a<|tool|>b", add_special_tokens=False)[1:2] == [32000]
    assert tok.decode(tok.encode("a<|tool|>b"), skip_special_tokens=False) == "a<|tool|>b</s>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert prompt == "<s>[user]x</s>"
