"""The block manager under random admit / step / fork / copy-on-write / free / preempt.

Beside the manager, the test keeps what the K/V cache would hold: one token per slot,
written by each step and copied by copy-on-write. Every computed token of every live
sequence must be found there, which is what prefix hits and forks have to preserve.
"""

from collections import Counter

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.kv_cache.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=10)  # few ids: blocks repeat


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(6, 32), block_size=st.sampled_from([1, 2, 4]),
                caching=st.sampled_from([True, True, False]))
    def setup(self, num_blocks, block_size, caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.slots = {}                                    # (block, offset) -> token in the cache
        self.running: list[Sequence] = []
        self.preempted: list[Sequence] = []
        self.prompts: list[list[int]] = []
        self.next_id = 0

    def new_seq(self, token_ids) -> Sequence:
        self.next_id += 1
        return Sequence(self.next_id, str(self.next_id), 0, token_ids, SamplingParams(), 0, None)

    def admit(self, s: Sequence) -> None:
        cached = self.bm.allocate_prefix(s)
        bs = self.bm.block_size
        assert cached == s.num_computed_tokens == s.num_cached_tokens
        assert cached % bs == 0 and cached <= s.num_tokens - 1
        assert self.bm.enable_prefix_caching or cached == 0
        self.running.append(s)

    # ---- rules --------------------------------------------------------------------

    @rule(shared=st.integers(0, 30), own=TOKENS, pick=st.integers(0, 99))
    def admit_new(self, shared, own, pick):
        prefix = self.prompts[pick % len(self.prompts)][:shared] if self.prompts else []
        self.prompts.append(prefix + own)
        self.admit(self.new_seq(prefix + own))

    @precondition(lambda self: self.running)
    @rule(chunks=st.lists(st.integers(1, 12), min_size=4, max_size=4),
          sampled=st.integers(0, 2))
    def step(self, chunks, sampled):
        """One engine step: every running sequence that fits computes a chunk."""
        for i, s in enumerate(self.running):
            self.step_one(s, min(chunks[i % 4], s.num_tokens - s.num_computed_tokens), sampled)

    def step_one(self, s: Sequence, n: int, sampled: int) -> None:
        if not self.bm.can_allocate(s, n):
            return
        free_before, needed = self.bm.num_free_blocks, self.bm.num_blocks_needed(s, n)
        self.copy(self.bm.copy_on_write(s))
        self.bm.allocate(s, n)
        assert free_before - self.bm.num_free_blocks == needed
        bs = self.bm.block_size
        for pos in range(s.num_computed_tokens, s.num_computed_tokens + n):
            block = s.block_table[pos // bs]
            assert self.bm.blocks[block].ref_count == 1, "a step writes into a shared block"
            self.slots[block, pos % bs] = s.token_ids[pos]
        s.num_computed_tokens += n
        self.bm.commit(s)
        if s.num_computed_tokens == s.num_tokens:  # the step's logits give the next token
            s.token_ids.append(sampled)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 99), sampled=st.integers(0, 2))
    def fork(self, pick, sampled):
        parent = self.running[pick % len(self.running)]
        child = self.new_seq(list(parent.token_ids))
        child.token_ids[-1] = sampled  # not computed yet: the two may diverge from here
        self.bm.fork(parent, child)
        self.running.append(child)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 99))
    def copy_on_write(self, pick):
        s = self.running[pick % len(self.running)]
        if self.bm.num_blocks_needed(s, 1) > self.bm.num_free_blocks:
            return
        self.copy(self.bm.copy_on_write(s))
        assert self.bm.copy_on_write(s) is None

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 99), is_preempted=st.booleans())
    def leave(self, pick, is_preempted):
        """Finish or abort (blocks stay cached), or preempt (re-admitted later)."""
        s = self.running.pop(pick % len(self.running))
        self.bm.free(s)
        if is_preempted:
            s.num_computed_tokens = 0
            self.preempted.append(s)

    @precondition(lambda self: self.preempted)
    @rule()
    def readmit(self):
        self.admit(self.preempted.pop(0))

    @precondition(lambda self: len(self.running) > 4)
    @rule(is_reset=st.booleans())
    def finish_all(self, is_reset):
        for s in self.running:
            self.bm.free(s)
        self.running = []
        assert self.bm.num_free_blocks == self.bm.num_blocks
        if is_reset:
            self.bm.reset_prefix_cache()
            assert self.bm.hash_to_block == {}

    def copy(self, pair):
        if pair is not None:
            src, dst = pair
            for offset in range(self.bm.block_size):
                if (src, offset) in self.slots:
                    self.slots[dst, offset] = self.slots[src, offset]

    # ---- invariants ---------------------------------------------------------------

    @invariant()
    def refcounts_match_the_tables(self):
        owners = Counter(b for s in self.running for b in s.block_table)
        for block in self.bm.blocks:
            assert block.ref_count == owners[block.block_id], block.block_id
        free = set(self.bm.free_queue)
        assert len(free) == len(self.bm.free_queue)       # nothing freed twice
        assert not free & owners.keys()                   # nothing both free and owned
        assert len(free) + len(owners) == self.bm.num_blocks  # nothing leaked
        for s in self.running:
            assert len(set(s.block_table)) == len(s.block_table)
            assert len(s.block_table) >= self.bm.blocks_for(s.num_computed_tokens)
        for s in self.preempted:
            assert s.block_table == [] and s.block_hashes == []

    @invariant()
    def cached_hashes_name_the_right_tokens(self):
        bm, bs = self.bm, self.bm.block_size
        for h, block_id in bm.hash_to_block.items():
            assert bm.blocks[block_id].hash == h and len(bm.blocks[block_id].token_ids) == bs
        for s in self.running:
            if bm.enable_prefix_caching:
                assert len(s.block_hashes) == s.num_computed_tokens // bs
            for i, h in enumerate(s.block_hashes):
                tokens = tuple(s.token_ids[i * bs:(i + 1) * bs])
                if h in bm.hash_to_block:
                    assert bm.blocks[bm.hash_to_block[h]].token_ids == tokens
                block = bm.blocks[s.block_table[i]]
                assert block.hash in (None, h) and block.token_ids in ((), tokens)

    @invariant()
    def the_cache_holds_every_computed_token(self):
        bs = self.bm.block_size
        for s in self.running:
            for pos in range(s.num_computed_tokens):
                assert self.slots.get((s.block_table[pos // bs], pos % bs)) == s.token_ids[pos]

    def teardown(self):
        if hasattr(self, "bm"):
            for s in self.running:
                self.bm.free(s)
            assert self.bm.num_free_blocks == self.bm.num_blocks
            assert sorted(self.bm.free_queue) == list(range(self.bm.num_blocks))


BlockManagerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=60,
                                                 deadline=None)
test_block_manager_machine = BlockManagerMachine.TestCase
