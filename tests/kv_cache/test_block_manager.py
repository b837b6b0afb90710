"""The block manager's bookkeeping: allocation, prefix hits, eviction order, forks."""

import pytest
from hypothesis import given, strategies as st

from engine.kv_cache import block_manager
from engine.kv_cache.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def seq(num_tokens: int, seq_id: int = 0, tokens=None) -> Sequence:
    tokens = list(range(num_tokens)) if tokens is None else list(tokens)
    return Sequence(seq_id, str(seq_id), 0, tokens, SamplingParams(), 0, None)


def prefill(bm: BlockManager, s: Sequence) -> int:
    """Admit s, compute every token it has, register its blocks; the cached count."""
    cached = bm.allocate_prefix(s)
    bm.allocate(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)
    return cached


# ---- allocation -------------------------------------------------------------------------

def test_allocate_covers_the_tokens_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(10)
    assert bm.num_blocks_needed(s, 10) == 3 and bm.can_allocate(s, 10)
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    s.num_computed_tokens = 10
    assert bm.num_blocks_needed(s, 2) == 0  # the third block has room for 2 more
    bm.allocate(s, 3)
    assert len(s.block_table) == 4
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 8


def test_allocation_beyond_the_cache_is_refused():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(9)
    assert not bm.can_allocate(s, 9)
    with pytest.raises(RuntimeError, match="3 blocks needed, 2 free"):
        bm.allocate(s, 9)
    assert bm.num_free_blocks == 2 and s.block_table == []


@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(1, 8))
def test_sequences_never_share_blocks_and_all_come_back(lengths, block_size):
    bm = BlockManager(num_blocks=200, block_size=block_size, enable_prefix_caching=False)
    seqs = [seq(n, i) for i, n in enumerate(lengths)]
    for s in seqs:
        if bm.can_allocate(s, s.num_tokens):
            bm.allocate(s, s.num_tokens)
    owned = [b for s in seqs for b in s.block_table]
    assert len(owned) == len(set(owned))
    assert bm.num_free_blocks + len(owned) == 200
    for s in seqs:
        bm.free(s)
    assert sorted(bm.free_queue) == list(range(200))


# ---- prefix caching ---------------------------------------------------------------------

def test_a_shared_prefix_is_reused_up_to_whole_blocks():
    bm = BlockManager(num_blocks=200, block_size=16)
    prefix = list(range(1000, 2000))
    first = seq(0, 0, prefix + [7, 8, 9])
    assert prefill(bm, first) == 0
    second = seq(0, 1, prefix + [5])
    assert prefill(bm, second) == 992 == second.num_cached_tokens
    assert second.block_table[:62] == first.block_table[:62]
    assert bm.blocks[first.block_table[0]].ref_count == 2
    assert bm.num_prefix_hit_tokens == 992
    assert bm.num_prefix_queries_tokens == first.num_tokens + second.num_tokens


def test_a_finished_sequence_stays_cached_until_evicted():
    bm = BlockManager(num_blocks=8, block_size=4)
    prefill(bm, first := seq(9, 0))
    bm.free(first)
    assert bm.num_free_blocks == 8
    assert prefill(bm, seq(9, 1)) == 8


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    prefill(bm, seq(8, 0))
    again = seq(8, 1)
    assert bm.allocate_prefix(again) == 4  # 8 tokens cached, but the step needs logits
    assert again.num_computed_tokens == 4 and len(again.block_table) == 1


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=200, block_size=16, enable_prefix_caching=False)
    prefill(bm, seq(1000, 0))
    second = seq(1001, 1)
    assert prefill(bm, second) == 0 and second.num_cached_tokens == 0
    assert bm.hash_to_block == {} and bm.num_prefix_hit_tokens == 0


def test_a_hash_collision_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(block_manager, "hash_block", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=16, block_size=4)
    prefill(bm, seq(0, 0, range(12)))
    other = seq(0, 1, range(100, 112))
    assert prefill(bm, other) == 0
    same = seq(0, 2, list(range(4)) + [50] * 8)  # block 0 is a true hit; the rest collide
    assert bm.allocate_prefix(same) == 4


def test_eviction_takes_the_least_recently_freed_block_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = seq(0, 0, [1, 2, 3, 4, 9]), seq(0, 1, [5, 6, 7])
    prefill(bm, a)  # [1, 2] [3, 4] [9]
    prefill(bm, b)  # [5, 6] [7]
    a_table, b_table = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    # never used first, then each sequence's tail before its head
    assert list(bm.free_queue) == [5, *reversed(a_table), *reversed(b_table)]
    bm.allocate(seq(8, 2, [0] * 8), 8)  # four blocks: evicts block 5 and all of a's
    assert bm.allocate_prefix(seq(0, 3, [1, 2, 3, 4, 0])) == 0
    assert bm.allocate_prefix(seq(0, 4, [5, 6, 0])) == 2  # b's full block survived


def test_a_hit_on_a_free_block_takes_it_out_of_the_free_queue():
    bm = BlockManager(num_blocks=4, block_size=2)
    prefill(bm, a := seq(3, 0))
    bm.free(a)
    again = seq(3, 1)
    assert bm.allocate_prefix(again) == 2
    assert again.block_table[0] not in bm.free_queue and bm.num_free_blocks == 3


# ---- forks and copy-on-write ------------------------------------------------------------

def test_a_fork_shares_blocks_until_the_first_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq(6, 0)
    prefill(bm, parent)  # a full block and a half-full one
    child = seq(6, 1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and child.num_computed_tokens == 6
    assert child.block_hashes == parent.block_hashes
    parent.token_ids.append(100)
    child.token_ids.append(200)
    assert bm.num_blocks_needed(child, 1) == 1  # no new block, but a copy of the shared one
    shared = parent.block_table[1]
    src, dst = bm.copy_on_write(child)
    assert src == shared and dst not in parent.block_table and child.block_table[1] == dst
    assert bm.copy_on_write(child) is None
    assert bm.copy_on_write(parent) is None  # the other owner now has it alone
    assert bm.blocks[parent.block_table[0]].ref_count == 2  # the full block stays shared
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_copy_on_write_of_an_unshared_or_missing_block_is_none():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(8, 0)
    prefill(bm, s)  # two full blocks: the next token opens a third
    t = seq(8, 1)
    bm.fork(s, t)
    assert bm.copy_on_write(t) is None and bm.num_blocks_needed(t, 1) == 1
