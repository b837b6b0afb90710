"""Missing or unusable tokenizer files raise ValueError naming the file and what was expected."""

from __future__ import annotations

import pytest

from engine.tokenizer import load_tokenizer, write_hf_tokenizer_from_gguf

gguf = pytest.importorskip("gguf")


def write_gguf(path, model, pre=None, tokens=("a", "b", "ab"), merges=("a b",)):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(tokens))
    writer.add_token_types([1] * len(tokens))
    if merges:
        writer.add_token_merges(list(merges))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"{missing}.*no such file"):
        load_tokenizer(missing)


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="tokenizer.model.*SentencePiece"):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bad_config_json(tmp_path):
    write_gguf(tmp_path / "m.gguf", "gpt2", pre="gpt-2")
    write_hf_tokenizer_from_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json.*JSON"):
        load_tokenizer(tmp_path / "hf")


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv"])
def test_unknown_gguf_tokenizer_model(tmp_path, model):
    path = write_gguf(tmp_path / "m.gguf", model, merges=())
    with pytest.raises(ValueError, match=f"m.gguf.*unsupported tokenizer.ggml.model '{model}'"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.model"):
        write_hf_tokenizer_from_gguf(path, tmp_path / "out")


def test_unknown_gguf_pre_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gpt2", pre="mystery")
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.pre 'mystery'"):
        load_tokenizer(path)


def test_gguf_without_tokenizer(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no tokenizer.ggml.model"):
        load_tokenizer(tmp_path / "m.gguf")


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gpt2", pre="gpt-2", tokens=[f"t{i}" for i in range(50)])
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf.*past the end"):
        load_tokenizer(tmp_path / "cut.gguf")


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="x.gguf.*not a GGUF file"):
        load_tokenizer(tmp_path / "x.gguf")


def test_other_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(bytes(10))
    with pytest.raises(ValueError, match="weights.bin.*expected a model folder or a .gguf"):
        load_tokenizer(tmp_path / "weights.bin")


def test_tiny_gguf_bpe_loads(tmp_path):
    tok = load_tokenizer(write_gguf(tmp_path / "m.gguf", "gpt2", pre="gpt-2"))
    assert tok.encode("ab") == [2]
    assert tok.decode([0, 1]) == "ab"
