"""Which physical KV blocks each sequence owns. Pure bookkeeping: never touches arrays."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockManager: num_blocks and block_size must be positive, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq, num_new_tokens: int) -> int:
        """Blocks seq must gain to hold num_new_tokens more computed tokens."""
        total = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq, num_new_tokens: int) -> None:
        """Grow seq.block_table to cover num_new_tokens more tokens."""
        needed = self.num_new_blocks(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"BlockManager: {needed} blocks needed, {self.num_free_blocks} free")
        for _ in range(needed):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
