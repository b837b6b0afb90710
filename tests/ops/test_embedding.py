"""embedding against ops.reference, on every instruction set."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from engine import ops
from engine.ops import reference


@pytest.mark.parametrize("table_dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@given(num_tokens=st.sampled_from([0, 1, 3, 17, 769]), vocab=st.sampled_from([1, 3, 17, 769]),
       hidden=st.sampled_from([1, 3, 17, 769]), strided=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_embedding_matches_reference(isa, table_dtype, num_tokens, vocab, hidden, strided, seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, hidden)).astype(table_dtype)
    ids = rng.integers(0, vocab, num_tokens * (2 if strided else 1)).astype(np.int32)
    if strided:
        ids = ids[::2]
    out = np.full((num_tokens, hidden + (3 if strided else 0)), -7, np.float32)[:, :hidden]
    want = np.empty((num_tokens, hidden), np.float32)
    ops.embedding(ids, table, out=out)
    reference.embedding(ids, table, out=want)
    np.testing.assert_array_equal(out, want)  # a widening copy: exact


def test_f16_specials_are_exact(isa):
    bits = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
    table = bits.view(np.float16).reshape(64, 1024)  # every half, subnormals, infs and NaNs
    ids = np.arange(64, dtype=np.int32)[::-1].copy()
    out = np.empty((64, 1024), np.float32)
    ops.embedding(ids, table, out=out)
    want = table[ids].astype(np.float32)
    np.testing.assert_array_equal(out.view(np.uint32)[~np.isnan(want)],
                                  want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(out[np.isnan(want)]).all()


@pytest.mark.parametrize("case,match", [
    ("id_high", r"embedding: ids\[2\] = 10 is outside \[0, 10\)"),
    ("id_negative", r"embedding: ids\[0\] = -1 is outside \[0, 10\)"),
    ("ids_dtype", "embedding: ids must be int32"),
    ("table_dtype", "embedding: table must be float32 or float16 or bfloat16"),
    ("table_inner_stride", "embedding: table must have a contiguous last dimension"),
    ("out_shape", r"embedding: out must have shape \[3, 4\]"),
    ("out_dtype", "embedding: out must be float32"),
    ("out_readonly", "embedding: out must be a writeable array"),
])
def test_embedding_rejects(rng, case, match):
    ids = np.array([0, 9, 3], np.int32)
    table = rng.standard_normal((10, 4)).astype(np.float32)
    out = np.zeros((3, 4), np.float32)
    if case == "id_high":
        ids[2] = 10
    elif case == "id_negative":
        ids[0] = -1
    elif case == "ids_dtype":
        ids = ids.astype(np.int64)
    elif case == "table_dtype":
        table = table.astype(np.int32)
    elif case == "table_inner_stride":
        table = np.repeat(table, 2, axis=1)[:, ::2]
    elif case == "out_shape":
        out = np.zeros((2, 4), np.float32)
    elif case == "out_dtype":
        out = out.astype(np.float16)
    elif case == "out_readonly":
        out.flags.writeable = False
    before = out.copy()
    with pytest.raises(ValueError, match=match):
        ops.embedding(ids, table, out=out)
    np.testing.assert_array_equal(out, before)
