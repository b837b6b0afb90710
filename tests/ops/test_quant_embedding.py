"""quant_embedding against gguf's dequantisers: the same float32 arithmetic, so exact."""

import numpy as np
import pytest
from hypothesis import given, strategies as st
from quant_blocks import GuardedBuffer, random_blocks

from engine import ops
from engine.ops import reference
from engine.ops.quantized import FORMATS, QuantizedWeight


@pytest.mark.parametrize("fmt", list(FORMATS))
@given(num_blocks=st.integers(1, 4), vocab=st.integers(1, 40), num_tokens=st.integers(0, 9),
       pad_out=st.sampled_from([0, 3]), seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, fmt, num_blocks, vocab, num_tokens, pad_out, seed):
    rng = np.random.default_rng(seed)
    hidden = num_blocks * FORMATS[fmt][0]
    table = random_blocks(rng, fmt, vocab, hidden)
    ids = rng.integers(0, vocab, num_tokens).astype(np.int32)
    out = np.full((num_tokens, hidden + pad_out), 7.0, np.float32)[:, :hidden]
    ops.embedding(ids, QuantizedWeight(table, fmt, hidden), out=out)
    want = np.empty((num_tokens, hidden), np.float32)
    reference.quant_embedding(ids, table, fmt, out=want)
    np.testing.assert_array_equal(out, want)
    assert np.all(out.base[:, hidden:] == 7.0)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_last_row_reads_nothing_past_the_table(rng, fmt):
    hidden = FORMATS[fmt][0]
    table = random_blocks(rng, fmt, 3, hidden)
    guarded = GuardedBuffer(table.nbytes).holding(table)
    out = ops.embedding(np.array([2], np.int32), QuantizedWeight(guarded, fmt, hidden),
                        out=np.empty((1, hidden), np.float32))
    np.testing.assert_array_equal(out, reference.dequantize_blocks(table[2:], fmt))


@pytest.mark.parametrize("ids,arg", [([0, 3], "ids"), ([-1], "ids")])
def test_rejects_ids_outside_the_table(ids, arg):
    table = np.zeros((3, 34), np.uint8)
    out = np.full((len(ids), 32), 5.0, np.float32)
    with pytest.raises(ValueError, match=rf"quant_embedding: {arg}\[\d\] = -?\d+ is outside \[0, 3\)"):
        ops._C.quant_embedding(np.array(ids, np.int32), table, "q8_0", out)
    assert np.all(out == 5.0)


@pytest.mark.parametrize("table,fmt,out_cols,match", [
    (np.zeros((3, 34), np.uint8), "q4_0", 32, r"table must be uint8 \[vocab, 18\]"),
    (np.zeros((3, 34), np.uint8), "q8_0", 48, "multiple of 32"),
    (np.zeros((3, 34), np.uint8), "f16", 32, "format: unknown quantisation format"),
])
def test_rejects_bad_layouts(table, fmt, out_cols, match):
    with pytest.raises(ValueError, match=match):
        ops._C.quant_embedding(np.zeros(1, np.int32), table, fmt,
                               np.empty((1, out_cols), np.float32))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@given(num_blocks=st.sampled_from([1, 3, 4, 5, 9]), vocab=st.integers(1, 40),
       num_tokens=st.integers(0, 9), seed=st.integers(0, 2**32 - 1))
def test_tiled_table_gives_the_same_rows(isa, fmt, num_blocks, vocab, num_tokens, seed):
    """A tied embedding and LM head in 4-row tiles (QuantizedWeight.interleaved)."""
    rng = np.random.default_rng(seed)
    hidden = 32 * num_blocks
    table = QuantizedWeight(random_blocks(rng, fmt, vocab, hidden), fmt, hidden)
    ids = rng.integers(0, vocab, num_tokens).astype(np.int32)
    want = ops.embedding(ids, table, out=np.empty((num_tokens, hidden), np.float32))
    tiled = table.interleaved()
    guarded = QuantizedWeight(GuardedBuffer(tiled.nbytes).holding(tiled.data), fmt, hidden, 4)
    got = ops.embedding(ids, guarded, out=np.empty((num_tokens, hidden), np.float32))
    np.testing.assert_array_equal(got, want)
