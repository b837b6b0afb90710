"""rope_cos_sin_cache against transformers' own rotary embedding (default, linear, llama3)."""

import numpy as np
import pytest

from engine.model.rope import rope_cos_sin_cache, rope_inv_freq, rope_parameters

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# (head_dim, base, scaling): real models' settings, where transformers' float32 pow
# happens to be correctly rounded, so the caches agree to float32 rounding.
MODELS = [
    (64, 10000.0, None),                                 # SmolLM2
    (128, 10000.0, None),                                # Llama 2
    (64, 1000000.0, None),                               # Qwen2.5-0.5B
    (128, 500000.0, LLAMA3),                             # Llama 3.1
    (64, 500000.0, LLAMA3),                              # Llama 3.2 1B
    (64, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    (128, 10000.0, {"type": "linear", "factor": 2.0}),   # the transformers 4 key
]


def hf_rotary(head_dim, base, scaling):
    rope = {"rope_theta": base, "rope_type": "default"}
    if scaling:
        rope = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_theta": base,
                "rope_type": scaling.get("rope_type", scaling.get("type"))}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=16384, rope_parameters=rope)
    return LlamaRotaryEmbedding(config=config)


@pytest.mark.parametrize("head_dim,base,scaling", MODELS)
def test_cache_matches_transformers(head_dim, base, scaling):
    emb = hf_rotary(head_dim, base, scaling)
    np.testing.assert_array_equal(rope_inv_freq(head_dim, base, scaling), emb.inv_freq.numpy())
    max_position = 9000
    positions = torch.arange(max_position)[None]
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), positions)
    cache = rope_cos_sin_cache(head_dim, max_position, base, scaling)
    assert cache.dtype == np.float32 and cache.shape == (max_position, head_dim)
    half = head_dim // 2
    np.testing.assert_allclose(cache[:, :half], cos[0, :, :half].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cache[:, half:], sin[0, :, :half].numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rotary_dim", [2, 16, 32, 48, 80, 96, 128, 256])
@pytest.mark.parametrize("base", [10000.0, 1000000.0, 75000.0])
@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 3.0}])
def test_inv_freq_close_to_transformers(rotary_dim, base, scaling):
    # transformers' float32 pow is off by an ulp now and then; llama3's smoothing
    # can grow that to a few ulps.
    ours = rope_inv_freq(rotary_dim, base, scaling)
    theirs = hf_rotary(rotary_dim, base, scaling).inv_freq.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


def test_partial_rotary_dim():
    cache = rope_cos_sin_cache(16, 5, 10000.0, None)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    angles = np.arange(5)[:, None] * inv_freq
    np.testing.assert_allclose(cache, np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-6)


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError, match="'yarn'.*supported: default, linear, llama3"):
        rope_cos_sin_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_missing_llama3_field_is_rejected():
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_cos_sin_cache(64, 16, 10000.0, {"rope_type": "llama3", "factor": 8.0})


@pytest.mark.parametrize("rotary_dim,max_position", [(0, 4), (7, 4), (8, 0)])
def test_bad_sizes_are_rejected(rotary_dim, max_position):
    with pytest.raises(ValueError, match="rope"):
        rope_cos_sin_cache(rotary_dim, max_position, 10000.0, None)


def test_rope_parameters_transformers4_form():
    assert rope_parameters({}) == (10000.0, None)
    assert rope_parameters({"rope_theta": 1e6, "rope_scaling": None}) == (1e6, None)
    base, scaling = rope_parameters({"rope_theta": 5e5, "rope_scaling": dict(LLAMA3)})
    assert base == 5e5 and scaling == LLAMA3
    assert rope_parameters({"rope_scaling": {"type": "default"}}) == (10000.0, None)


def test_rope_parameters_transformers5_form():
    assert rope_parameters({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}) == (
        1e6, None)
    base, scaling = rope_parameters({"rope_parameters": {"rope_theta": 5e5, **LLAMA3}})
    assert base == 5e5 and scaling == LLAMA3
    with pytest.raises(ValueError, match="per layer type"):
        rope_parameters({"rope_parameters": {"full_attention": {"rope_theta": 1.0},
                                             "sliding_attention": {"rope_theta": 2.0}}})


def test_rope_parameters_of_a_transformers_config_dict():
    config = LlamaConfig(rope_parameters={"rope_theta": 5e5, **LLAMA3}).to_dict()
    base, scaling = rope_parameters(config)
    assert base == 5e5
    np.testing.assert_array_equal(rope_inv_freq(64, base, scaling),
                                  hf_rotary(64, 5e5, LLAMA3).inv_freq.numpy())
