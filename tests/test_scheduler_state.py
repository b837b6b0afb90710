"""The scheduler and the block manager together, under random admit / step / abort, no model.

The machine plays the engine's part: it admits requests (n > 1 as the engine does: the
first sequence computes the prompt and forks the others just before its last token), forks
ready parents with LLMEngine._fork_ready_parents itself, runs each step's copies and writes
against a model of the K/V cache, appends a token whenever a sequence's computed tokens
catch up with its tokens, and finishes it at max_tokens. The cache is small, so preemption
and prefix-cache eviction happen often.

The cache model stores, in each slot, the whole prefix a position's K/V depends on (the
tokens up to and including it), so a prefix hit on the wrong chain, a write into a shared
block, or a copy the runner was not told about shows up as a wrong slot.
"""

import random
from collections import Counter
from types import SimpleNamespace

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.engine import LLMEngine
from engine.kv_cache.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

OWN_TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=12)  # few ids: blocks repeat


def fork_ready_parents(scheduler: Scheduler) -> None:
    """The engine's own fork step, run on a bare scheduler."""
    LLMEngine._fork_ready_parents(SimpleNamespace(scheduler=scheduler,
                                                  block_manager=scheduler.block_manager))


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(3, 16), block_size=st.sampled_from([1, 2, 4]),
                max_num_batched_tokens=st.integers(1, 64), max_num_seqs=st.integers(1, 16),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks, block_size, max_num_batched_tokens, max_num_seqs, caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.sched = Scheduler(self.bm, max_num_batched_tokens, max_num_seqs)
        self.capacity = num_blocks * block_size          # tokens the whole cache holds
        self.requests: dict[str, list[Sequence]] = {}
        self.prompts: list[list[int]] = []
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> prefix
        self.next_id = 0
        self.steps_without_a_token = 0

    # ---- the engine's part ----------------------------------------------------------

    def add_request(self, prompt: list[int], max_tokens: int, n: int) -> None:
        """Admission as LLMEngine.add_request: blocks_for(prompt + max_tokens) <= num_blocks."""
        prompt = prompt[:self.capacity - 1]
        max_tokens = min(max_tokens, self.capacity - len(prompt))
        assert self.bm.blocks_for(len(prompt) + max_tokens) <= self.bm.num_blocks
        params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True)
        rid = f"r{self.next_id}"
        seqs = []
        for index in range(n):
            self.next_id += 1
            seqs.append(Sequence(self.next_id, rid, index, prompt, params, rng_state=0,
                                 detokenizer=None))
        seqs[0].pending_children = seqs[1:]
        self.requests[rid] = seqs
        self.prompts.append(prompt)
        self.sched.add(seqs[0])

    def abort_request(self, rid: str) -> None:
        """As LLMEngine.abort_request: every sequence of the request, forked or not."""
        for seq in self.requests.pop(rid):
            if not seq.is_finished:
                seq.finish("abort")
            self.sched.finish(seq)

    def live_seqs(self) -> list[Sequence]:
        """Sequences that may hold blocks now or later: queued, or children not yet forked."""
        queued = list(self.sched.running) + list(self.sched.waiting)
        return queued + [c for s in queued for c in s.pending_children]

    def step_once(self, rng: random.Random) -> bool:
        """One engine step; True if some sequence gained a token or finished."""
        has_work = self.sched.has_unfinished()
        fork_ready_parents(self.sched)
        out = self.sched.schedule()
        self.check_output(out)
        if has_work and not out.scheduled and not out.num_preempted:
            # Only a parent admitted with nothing left before its fork point idles a step;
            # the fork before the next schedule() gives it (and its children) work.
            assert any(s.pending_children and s.num_computed_tokens == s.num_tokens - 1
                       for s in self.sched.running), "schedule() idled with work pending"
        for src, dst in out.copies:                       # the runner copies first
            for offset in range(self.bm.block_size):
                if (src, offset) in self.slots:
                    self.slots[dst, offset] = self.slots[src, offset]
        progressed = False
        for seq, n in out.scheduled:
            self.write(seq, n)
            seq.num_computed_tokens += n
            self.bm.commit(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue                                  # a prompt chunk: nothing sampled
            seq.token_ids.append(rng.randrange(3))
            progressed = True
            if seq.num_output_tokens >= seq.params.max_tokens:
                seq.finish("length")
                self.sched.finish(seq)
        for rid in [r for r, seqs in self.requests.items() if all(s.is_finished for s in seqs)]:
            del self.requests[rid]
        return progressed

    def write(self, seq: Sequence, n: int) -> None:
        """What the model does: K/V of positions [computed, computed + n) into their slots."""
        bs = self.bm.block_size
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = seq.block_table[pos // bs]
            assert self.bm.blocks[block].ref_count == 1, f"step writes into shared block {block}"
            self.slots[block, pos % bs] = tuple(seq.token_ids[:pos + 1])

    def check_output(self, out) -> None:
        seqs = [seq for seq, _ in out.scheduled]
        assert len({id(s) for s in seqs}) == len(seqs), "a sequence scheduled twice in a step"
        assert all(n > 0 for _, n in out.scheduled), out.scheduled
        assert out.num_tokens <= self.sched.max_num_batched_tokens
        assert len(out.scheduled) <= self.sched.max_num_seqs
        for seq, n in out.scheduled:
            assert seq in self.sched.running, "scheduled, then preempted in the same step"
            assert seq.status is SequenceStatus.RUNNING
            assert seq.num_computed_tokens + n <= seq.num_tokens
            assert len(seq.block_table) >= self.bm.blocks_for(seq.num_computed_tokens + n)
        for src, dst in out.copies:
            assert 0 <= src < self.bm.num_blocks and 0 <= dst < self.bm.num_blocks
            assert src != dst and self.bm.blocks[dst].ref_count == 1
        assert len({dst for _, dst in out.copies}) == len(out.copies)

    # ---- rules ----------------------------------------------------------------------

    @rule(shared=st.integers(0, 40), own=OWN_TOKENS, pick=st.integers(0, 99),
          max_tokens=st.integers(1, 24))
    def add(self, shared, own, pick, max_tokens):
        prefix = self.prompts[pick % len(self.prompts)][:shared] if self.prompts else []
        self.add_request(prefix + own, max_tokens, n=1)

    @rule(shared=st.integers(0, 40), own=OWN_TOKENS, pick=st.integers(0, 99),
          max_tokens=st.integers(1, 12), n=st.integers(2, 4))
    def add_n(self, shared, own, pick, max_tokens, n):
        prefix = self.prompts[pick % len(self.prompts)][:shared] if self.prompts else []
        self.add_request(prefix + own, max_tokens, n=n)

    @rule(seed=st.integers(0, 2**32 - 1), num_steps=st.integers(1, 6))
    def step(self, seed, num_steps):
        rng = random.Random(seed)
        for _ in range(num_steps):
            if not self.sched.has_unfinished():
                self.steps_without_a_token = 0
                return
            if self.step_once(rng):
                self.steps_without_a_token = 0
            else:
                # The oldest running sequence is never preempted for a later one and always
                # fits alone, so it gains a token within (its tokens / 1 per step) + a fork.
                self.steps_without_a_token += 1
                assert self.steps_without_a_token <= self.capacity + 2, "livelock"

    @precondition(lambda self: self.requests)
    @rule(pick=st.integers(0, 99))
    def abort(self, pick):
        self.abort_request(sorted(self.requests)[pick % len(self.requests)])
        self.steps_without_a_token = 0

    @precondition(lambda self: self.requests)
    @rule()
    def abort_all(self):
        for rid in list(self.requests):
            self.abort_request(rid)
        self.steps_without_a_token = 0
        self.check_empty()

    # ---- invariants ---------------------------------------------------------------

    @invariant()
    def blocks_are_accounted_for(self):
        live = self.live_seqs()
        assert len({id(s) for s in live}) == len(live), "a sequence queued twice"
        owners = Counter(b for s in live for b in s.block_table)
        for block in self.bm.blocks:
            assert block.ref_count == owners[block.block_id], block.block_id
        free = set(self.bm.free_queue)
        assert free == {b.block_id for b in self.bm.blocks if b.ref_count == 0}
        assert not free & owners.keys(), "a block both free and referenced"
        assert len(free) + len(owners) == self.bm.num_blocks, "a block leaked"
        for h, block_id in self.bm.hash_to_block.items():
            assert self.bm.blocks[block_id].hash == h

    @invariant()
    def queues_are_consistent(self):
        for seq in self.sched.running:
            assert seq.status is SequenceStatus.RUNNING
            assert len(set(seq.block_table)) == len(seq.block_table)
            assert len(seq.block_table) >= self.bm.blocks_for(seq.num_computed_tokens)
            assert seq.num_computed_tokens < seq.num_tokens or seq.pending_children == []
        for seq in self.sched.waiting:
            assert seq.status is SequenceStatus.WAITING
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        assert not any(s.is_finished for s in self.live_seqs())

    @invariant()
    def the_cache_holds_every_computed_position(self):
        bs = self.bm.block_size
        for seq in self.sched.running:
            for pos in range(seq.num_computed_tokens):
                assert self.slots.get((seq.block_table[pos // bs], pos % bs)) == \
                    tuple(seq.token_ids[:pos + 1]), (seq.seq_id, pos)

    def check_empty(self):
        assert not self.sched.running and not self.sched.waiting
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)

    def teardown(self):
        """Run everything to completion (no livelock), then nothing is held."""
        if not hasattr(self, "bm"):
            return
        rng = random.Random(0)
        remaining = sum(s.params.max_tokens - s.num_output_tokens + 1
                        for seqs in self.requests.values() for s in seqs)
        for _ in range((remaining + 1) * (self.capacity + 2)):
            if not self.sched.has_unfinished():
                break
            self.step_once(rng)
            self.blocks_are_accounted_for()
            self.the_cache_holds_every_computed_position()
        assert not self.requests, f"unfinished after the step bound: {list(self.requests)}"
        self.check_empty()


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None)
test_scheduler_machine = SchedulerMachine.TestCase


def run_to_completion(sched: Scheduler, seqs: list[Sequence], max_steps: int = 1000) -> int:
    """Step as the engine does until every sequence finishes; returns the step count."""
    for seq in seqs:
        sched.add(seq)
    for step in range(max_steps):
        if not sched.has_unfinished():
            return step
        fork_ready_parents(sched)
        for seq, n in sched.schedule().scheduled:
            seq.num_computed_tokens += n
            sched.block_manager.commit(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    seq.finish("length")
                    sched.finish(seq)
    raise AssertionError(f"not finished after {max_steps} steps")


def test_two_sequences_too_long_to_share_the_cache_both_finish_by_preemption():
    bm = BlockManager(num_blocks=8, block_size=4)         # 32 tokens; each needs 24
    sched = Scheduler(bm, max_num_batched_tokens=16, max_num_seqs=4)
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    seqs = [Sequence(i, str(i), 0, [i + 1] * 10, params, rng_state=0, detokenizer=None)
            for i in range(2)]
    run_to_completion(sched, seqs)
    assert all(s.is_finished and s.num_output_tokens == 14 for s in seqs)
    assert sched.num_preemptions > 0
    assert bm.num_free_blocks == bm.num_blocks


def test_forked_children_finish_in_a_cache_with_no_room_for_all_of_them():
    bm = BlockManager(num_blocks=6, block_size=2)         # 12 tokens; each needs 7
    sched = Scheduler(bm, max_num_batched_tokens=8, max_num_seqs=8)
    params = SamplingParams(n=3, max_tokens=4, ignore_eos=True)
    seqs = [Sequence(i, "r", i, [1, 2, 3], params, rng_state=0, detokenizer=None)
            for i in range(3)]
    seqs[0].pending_children = seqs[1:]
    run_to_completion(sched, seqs[:1])
    assert all(s.is_finished and s.num_output_tokens == 4 for s in seqs)
    assert bm.num_free_blocks == bm.num_blocks
