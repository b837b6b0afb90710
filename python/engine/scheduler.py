"""Decides which sequences run in the next step and with how many new tokens.

This first scheduler runs one sequence at a time, first come first served: its
prompt in chunks of at most max_num_batched_tokens, then one token per step.
"""

from __future__ import annotations

from collections import deque

from engine.kv_cache.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, num_new_tokens)] for the next step, with blocks allocated."""
        if not self.running and self.waiting:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        scheduled = []
        for seq in self.running:
            n = min(seq.num_tokens - seq.num_computed_tokens, self.max_num_batched_tokens)
            self.block_manager.allocate(seq, n)
            scheduled.append((seq, n))
        return scheduled

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks."""
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
