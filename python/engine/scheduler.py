"""Decides which sequences run in the next step and with how many new tokens.

Each step has a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs). Running sequences go first (a decode is one token; an
unfinished prompt continues with its next chunk), then waiting sequences are
admitted in arrival order while the budget lasts, their prompts chunked to fit.
When the cache runs out of blocks, the most recently admitted running sequence
is preempted: its blocks are freed and it is recomputed later (prefix caching
usually makes that cheap). A preempted sequence goes back to the front of the
queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, num_new_tokens)
    copies: list[tuple[int, int]] = field(default_factory=list)  # KV blocks to copy first
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """Waiting and running sequences, and the policy above; pure Python over Sequences."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int,
                 max_num_seqs: int):
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts, with blocks allocated."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0 or len(out.scheduled) == self.max_num_seqs:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted to make room for an earlier one
                continue
            n = min(self._num_to_compute(seq), budget)
            if n == 0:  # a parent waiting to fork its children
                continue
            if not self._make_room(seq, n, out):
                break
            budget -= self._place(seq, n, out)
        if out.num_preempted == 0:
            budget = self._admit(budget, out)
        return out

    def _num_to_compute(self, seq: Sequence) -> int:
        """Tokens left before the next sample; a forking parent stops one short of its prompt
        so that each child computes the last prompt token (and samples) itself."""
        end = seq.num_tokens - 1 if seq.pending_children else seq.num_tokens
        return end - seq.num_computed_tokens

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt from the back of running until seq's n tokens fit; False if seq itself went."""
        while not self.block_manager.can_allocate(seq, n):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _place(self, seq: Sequence, n: int, out: SchedulerOutput) -> int:
        copy = self.block_manager.copy_on_write(seq)
        if copy is not None:
            out.copies.append(copy)
        self.block_manager.allocate(seq, n)
        out.scheduled.append((seq, n))
        return n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.num_preempted += 1
        self.num_preemptions += 1

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and len(out.scheduled) < self.max_num_seqs):
            seq = self.waiting[0]
            if not seq.block_table and seq.params.prompt_logprobs is None:
                # prompt logprobs need every prompt position computed: no prefix hits
                self.block_manager.allocate_prefix(seq)
            n = min(self._num_to_compute(seq), budget)
            if n > 0 and not self.block_manager.can_allocate(seq, n):
                self.block_manager.free(seq)  # give the prefix hits back; retry next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if n > 0:
                budget -= self._place(seq, n, out)
        return budget

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks."""
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
