"""The block manager's bookkeeping: allocation grows tables, free returns every block."""

from hypothesis import given, strategies as st

from engine.kv_cache.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def seq(num_tokens: int, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, list(range(num_tokens)), SamplingParams(), 0, None)


def test_allocate_covers_the_tokens_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(10)
    assert bm.num_new_blocks(s, 10) == 3 and bm.can_allocate(s, 10)
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    s.num_computed_tokens = 10
    assert bm.num_new_blocks(s, 2) == 0  # the third block has room for 2 more
    bm.allocate(s, 3)
    assert len(s.block_table) == 4
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 8


def test_allocation_beyond_the_cache_is_refused():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(9)
    assert not bm.can_allocate(s, 9)
    try:
        bm.allocate(s, 9)
    except RuntimeError as e:
        assert "3 blocks needed, 2 free" in str(e)
    else:
        raise AssertionError("allocate should refuse")
    assert bm.num_free_blocks == 2 and s.block_table == []


@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(1, 8))
def test_sequences_never_share_blocks_and_all_come_back(lengths, block_size):
    bm = BlockManager(num_blocks=200, block_size=block_size)
    seqs = [seq(n, i) for i, n in enumerate(lengths)]
    for s in seqs:
        if bm.can_allocate(s, s.num_tokens):
            bm.allocate(s, s.num_tokens)
    owned = [b for s in seqs for b in s.block_table]
    assert len(owned) == len(set(owned))
    assert bm.num_free_blocks + len(owned) == 200
    for s in seqs:
        bm.free(s)
    assert sorted(bm.free_blocks) == list(range(200))
