"""GGUF: llama metadata and tensors in Hugging Face terms, and malformed files rejected."""

import struct

import gguf
import numpy as np
import pytest

from engine.model.gguf_file import metadata, read_gguf
from engine.model.gguf_llama import GGUFWeights, hf_config, unpermute_rows
from engine.ops.quantized import QuantizedWeight
from engine.model.loader import load_checkpoint

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=50)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w, num_heads):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the inverse of what we undo)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)


def tiny_hf_weights(rng, c=TINY, tied=True):
    """Random weights of a tiny Llama under Hugging Face names, as float32."""
    h, q, kv, inter = (c["hidden_size"], c["num_attention_heads"] * c["head_dim"],
                       c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"])
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    if not tied:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    return {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}


def gguf_name(hf_name):
    if hf_name.startswith("model.layers."):
        _, _, idx, *rest = hf_name.split(".")
        return f"blk.{idx}.{GGUF_NAMES['.'.join(rest[:-1])]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}[hf_name]


def write_llama_gguf(path, weights, c=TINY, arch="llama", quantize=("mlp.up_proj",),
                     qtype=gguf.GGMLQuantizationType.Q8_0):
    """Write HF-named float32 weights as llama.cpp would: Q/K permuted, some tensors in
    qtype blocks.

    Returns the weights as they read back exactly (quantised tensors round-tripped)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_rope_freq_base(1e5)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_token_list([f"t{i}" for i in range(c["vocab_size"])])
    writer.add_token_types([1] * c["vocab_size"])
    expected = {}
    for name, w in weights.items():
        stored = w
        if ".q_proj." in name:
            stored = llama_cpp_permute(w, c["num_attention_heads"])
        elif ".k_proj." in name:
            stored = llama_cpp_permute(w, c["num_key_value_heads"])
        if any(q in name for q in quantize):
            raw = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
            deq = gguf.quants.dequantize(raw, qtype)
            if ".q_proj." in name:
                deq = unpermute_rows(deq, c["num_attention_heads"])
            elif ".k_proj." in name:
                deq = unpermute_rows(deq, c["num_key_value_heads"])
            expected[name] = deq
        else:
            writer.add_tensor(gguf_name(name), stored)
            expected[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def tiny_gguf(tmp_path, rng):
    path = tmp_path / "tiny.gguf"
    expected = write_llama_gguf(path, tiny_hf_weights(rng))
    return path, expected


def test_config_and_weights(tiny_gguf):
    path, expected = tiny_gguf
    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "gguf"
    c = checkpoint.config
    for key, value in TINY.items():
        assert c[key] == value, key
    assert c["architectures"] == ["LlamaForCausalLM"] and c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 1e5 and c["rms_norm_eps"] == 1e-5
    assert c["max_position_embeddings"] == 256 and c["torch_dtype"] == "float32"
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert set(checkpoint.weights) == set(expected)
    for name, w in expected.items():
        got = checkpoint.weights[name]  # as stored: float32, or Q8_0 blocks for up_proj
        assert isinstance(got, QuantizedWeight) == (".up_proj." in name), name
        assert got.shape == w.shape and checkpoint.weights.shape(name) == w.shape, name
        got = got.dequantize() if isinstance(got, QuantizedWeight) else got
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, w, err_msg=name)  # exact: un-permuted
    dequantized = GGUFWeights(read_gguf(path), c, dequantize=True)
    for name, w in expected.items():
        assert dequantized[name].dtype == np.float32
        np.testing.assert_array_equal(dequantized[name], w, err_msg=name)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantised_q_and_k_rows_are_unpermuted_whole(tmp_path, rng, qtype):
    """llama.cpp permutes Q/K rows; blocks lie along a row, so moving whole rows undoes it."""
    path = tmp_path / "q.gguf"
    expected = write_llama_gguf(path, tiny_hf_weights(rng),
                                quantize=("self_attn.q_proj", "self_attn.k_proj"),
                                qtype=gguf.GGMLQuantizationType[qtype])
    weights = load_checkpoint(path).weights
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        got = weights[name]
        assert isinstance(got, QuantizedWeight) and got.format == qtype.lower()
        np.testing.assert_array_equal(got.dequantize(), expected[name])


def test_untied_and_metadata(tmp_path, rng):
    path = tmp_path / "untied.gguf"
    expected = write_llama_gguf(path, tiny_hf_weights(rng, tied=False))
    parsed = read_gguf(path)
    config = hf_config(parsed)
    assert config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(GGUFWeights(parsed, config)["lm_head.weight"],
                                  expected["lm_head.weight"])
    meta = metadata(parsed)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    assert "tokenizer.ggml.tokens" not in metadata(parsed, include_vocab=False)


def test_matches_gguf_reader(tiny_gguf):
    """Metadata, tensor infos and tensor bytes agree with gguf.GGUFReader, the oracle."""
    path, _ = tiny_gguf
    parsed, reader = read_gguf(path), gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert parsed.metadata == fields
    assert list(parsed.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = parsed.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert (info.ggml_type, info.offset, info.nbytes) == \
            (t.tensor_type, t.data_offset, t.n_bytes), t.name
        raw = parsed.tensor_bytes(t.name)
        assert raw.dtype == np.uint8 and not raw.flags.writeable and raw.base is not None
        np.testing.assert_array_equal(raw, t.data.reshape(-1).view(np.uint8), err_msg=t.name)


def test_unknown_architecture(tmp_path, rng):
    path = tmp_path / "other.gguf"
    write_llama_gguf(path, tiny_hf_weights(rng), arch="gpt2")
    with pytest.raises(ValueError, match=r"other\.gguf: unsupported architecture 'gpt2'"):
        load_checkpoint(path)


def tensor_info_offsets(path):
    """Byte positions of (n_dims, type, offset) fields of each tensor info, by tensor name."""
    reader = gguf.GGUFReader(str(path))
    result = {}
    for t in reader.tensors:
        parts = t.field.parts  # name_len, name, n_dims, dims, type, offset
        starts = np.cumsum([0] + [p.nbytes for p in parts]) + t.field.offset
        result[t.name] = {"n_dims": int(starts[2]), "type": int(starts[4]),
                          "offset": int(starts[5])}
    return result, reader


def patch(path, position, fmt, value):
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, position, value)
    path.write_bytes(bytes(data))


def test_truncated(tiny_gguf):
    path, _ = tiny_gguf
    data = path.read_bytes()
    for size in sorted({0, 3, 4, 20, 23, 100, 500, 1000, len(data) // 2, len(data) - 1}):
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"tiny\.gguf: (truncated|file is empty|tensor)"):
            read_gguf(path)


def test_bad_magic_and_version(tiny_gguf):
    path, _ = tiny_gguf
    patch(path, 0, "4s", b"GGML")
    with pytest.raises(ValueError, match=r"tiny\.gguf: not a GGUF file \(magic b'GGML'"):
        read_gguf(path)
    patch(path, 0, "4s", b"GGUF")
    patch(path, 4, "I", 7)
    with pytest.raises(ValueError, match=r"tiny\.gguf: unsupported GGUF version 7"):
        read_gguf(path)


def test_tensor_offset_past_end(tiny_gguf):
    path, _ = tiny_gguf
    positions, _ = tensor_info_offsets(path)
    patch(path, positions["blk.1.ffn_down.weight"]["offset"], "Q", 2**40)
    with pytest.raises(ValueError, match=r"tiny\.gguf: tensor 'blk\.1\.ffn_down\.weight' data "
                                         r".* past the end of the file"):
        read_gguf(path)


def test_unknown_tensor_type_and_dims(tiny_gguf):
    path, _ = tiny_gguf
    positions, _ = tensor_info_offsets(path)
    patch(path, positions["output_norm.weight"]["type"], "I", 999)
    with pytest.raises(ValueError, match=r"tensor 'output_norm\.weight' has unknown tensor "
                                         r"type 999"):
        read_gguf(path)
    patch(path, positions["output_norm.weight"]["type"], "I", 0)
    patch(path, positions["output_norm.weight"]["n_dims"], "I", 2**31)
    with pytest.raises(ValueError, match=r"tensor 'output_norm\.weight' has 2147483648 dim"):
        read_gguf(path)


def test_lying_counts_fail_fast(tiny_gguf):
    """Counts far beyond the file fail at once instead of looping or allocating."""
    path, _ = tiny_gguf
    original = path.read_bytes()
    reader = gguf.GGUFReader(str(path))
    types_field = reader.fields["tokenizer.ggml.token_type"]
    key_len = int(types_field.parts[0][0])
    count_position = types_field.offset + 8 + key_len + 4 + 4  # key, value type, item type
    for position, fmt in [(8, "Q"), (16, "Q"), (count_position, "Q")]:
        for value in (2**63, 2**32):
            path.write_bytes(original)
            patch(path, position, fmt, value)
            with pytest.raises(ValueError, match=r"tiny\.gguf: truncated"):
                read_gguf(path)


def test_random_corruption_never_crashes(tiny_gguf):
    """Flipped header bytes open cleanly or raise ValueError; nothing else escapes."""
    path, _ = tiny_gguf
    original = path.read_bytes()
    header_end = gguf.GGUFReader(str(path)).data_offset
    rng = np.random.default_rng(1)
    for _ in range(150):
        data = bytearray(original)
        for position in rng.integers(0, header_end, size=3):
            data[position] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            checkpoint = load_checkpoint(path)
            for name in checkpoint.weights:
                checkpoint.weights[name]
        except ValueError:
            pass


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.gguf: no such file or folder"):
        load_checkpoint(tmp_path / "missing.gguf")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"weights\.bin: not a GGUF file"):
        load_checkpoint(other)
