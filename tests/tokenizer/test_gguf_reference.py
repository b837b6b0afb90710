"""llama.cpp's reference tokenizations: GGUF vocabularies must tokenize exactly as llama.cpp."""

from __future__ import annotations

import pytest
from assets import llama_cpp_vocab, read_llama_cpp_cases

from engine.tokenizer import load_tokenizer, write_hf_tokenizer_from_gguf
from engine.model.gguf_file import read_metadata

LLAMA_SPM_CASES = 46  # plus the trailing separator: "47" counting the empty tail


def test_llama_spm_count(llama_spm):
    cases = read_llama_cpp_cases(llama_cpp_vocab("llama-spm"))
    assert len(cases) == LLAMA_SPM_CASES
    assert llama_spm.vocab_size == 32000
    assert (llama_spm.bos_token_id, llama_spm.eos_token_id) == (1, 2)


@pytest.mark.parametrize("idx", range(LLAMA_SPM_CASES))
def test_llama_spm_reference(llama_spm, idx):
    text, expected = read_llama_cpp_cases(llama_cpp_vocab("llama-spm"))[idx]
    # The .out ids carry no BOS; the vocabulary's add_bos_token adds one otherwise.
    assert llama_spm.encode(text, add_special_tokens=False) == expected
    assert llama_spm.encode(text) == [llama_spm.bos_token_id] + expected


def test_llama_spm_decode_round_trip(llama_spm):
    for text, expected in read_llama_cpp_cases(llama_cpp_vocab("llama-spm")):
        assert llama_spm.decode(expected) == text


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "starcoder", "refact",
                                  "command-r", "phi-3"])
def test_other_vocab_references(name):
    path = llama_cpp_vocab(name)
    tok = load_tokenizer(path)
    wrong = [text for text, expected in read_llama_cpp_cases(path)
             if tok.encode(text, add_special_tokens=False) != expected]
    assert not wrong, f"{name}: {len(wrong)} texts tokenized differently: {wrong[:3]!r}"


def test_metadata_reader_matches_gguf_package():
    gguf = pytest.importorskip("gguf")
    path = llama_cpp_vocab("llama-spm")
    ours = read_metadata(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert ours[key] == field.contents(), key


@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_spm_written_folder_matches_transformers(name, tmp_path):
    """The folder written from a SentencePiece GGUF tokenizes as llama.cpp, in engine and in
    transformers (which reads its tokenizer.json)."""
    transformers = pytest.importorskip("transformers")
    path = llama_cpp_vocab(name)
    write_hf_tokenizer_from_gguf(path, tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    from_gguf = load_tokenizer(path)
    for text, expected in read_llama_cpp_cases(path):
        with_bos = [from_gguf.bos_token_id] + expected
        assert hf_tok.encode(text) == with_bos, text
        assert ours.encode(text) == with_bos, text
        assert hf_tok.decode(with_bos, skip_special_tokens=True) == from_gguf.decode(with_bos)
