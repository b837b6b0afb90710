"""Which physical KV blocks each sequence owns. Pure bookkeeping: never touches arrays.

Blocks are reference counted: forked sequences and sequences with a common prefix share
them. A full, computed block is keyed by a hash chain (its parent block's hash and its own
token ids), so a later sequence with the same prefix reuses it instead of recomputing it.
A block whose count drops to 0 joins the free queue but keeps its contents and hash: it
stays findable until allocation takes it, least recently freed first.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block: a 128-bit digest of (parent, tokens).

    sha256 rather than hash(): Python's tuple hash is not collision resistant, and a
    crafted prompt that collided could read K/V computed from another request's prefix.
    """
    parent = b"\xff" * 16 if parent_hash is None else parent_hash.to_bytes(16, "little")
    data = parent + struct.pack(f"<{len(token_ids)}q", *token_ids)
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "little")


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None                # set once the block is full and computed
        self.token_ids: tuple[int, ...] = ()        # compared on lookup: a hash is not proof


class BlockManager:
    """Allocation, reference counts, prefix caching and copy-on-write for forks.

    Args:
        num_blocks: physical blocks in the KV cache.
        block_size: tokens per block.
        enable_prefix_caching: register full blocks and reuse them across sequences.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockManager: num_blocks and block_size must be positive, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, in eviction order: taken from the front, freed to the end.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, cached or not."""
        return len(self.free_queue)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------

    def allocate_prefix(self, seq) -> int:
        """Give a sequence without blocks the longest cached run of its full blocks.

        At least one token is left to compute (the step needs its logits), so at most
        (seq.num_tokens - 1) // block_size blocks are reused.

        Returns:
            The reused token count, also set as seq.num_computed_tokens and
            seq.num_cached_tokens.
        """
        if seq.block_table:
            raise ValueError(f"BlockManager.allocate_prefix: sequence {seq.seq_id} already "
                             f"holds {len(seq.block_table)} blocks")
        seq.block_hashes = []
        self.num_prefix_queries_tokens += seq.num_tokens
        parent = None
        for i in range((seq.num_tokens - 1) // self.block_size if self.enable_prefix_caching
                       else 0):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        num_cached = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = num_cached
        self.num_prefix_hit_tokens += num_cached
        return num_cached

    def commit(self, seq) -> None:
        """Register the blocks that the last step filled, so later sequences can hit them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = hash_block(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.hash_to_block.setdefault(h, block.block_id)  # an identical block may hold it

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (blocks in use stay allocated, just not findable)."""
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash, block.token_ids = None, ()

    # ---- allocation -----------------------------------------------------------------

    def num_blocks_needed(self, seq, num_new_tokens: int) -> int:
        """Free blocks seq needs to compute num_new_tokens more: new ones plus a CoW copy."""
        growth = max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens)
                     - len(seq.block_table))
        is_cow = num_new_tokens > 0 and self._shared_write_block(seq) is not None
        return growth + int(is_cow)

    def can_allocate(self, seq, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq, num_new_tokens: int) -> None:
        """Grow seq.block_table to cover num_new_tokens more computed tokens."""
        needed = max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens)
                     - len(seq.block_table))
        if needed > self.num_free_blocks:
            raise RuntimeError(f"BlockManager: {needed} blocks needed, {self.num_free_blocks} free")
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def free(self, seq) -> None:
        """Drop seq's references; its tail blocks become the first to be evicted."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    # ---- forks ----------------------------------------------------------------------

    def fork(self, parent, child) -> None:
        """Let child share every block of parent (copied on the first write)."""
        if child.block_table:
            raise ValueError(f"BlockManager.fork: child {child.seq_id} already holds blocks")
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens

    def copy_on_write(self, seq) -> tuple[int, int] | None:
        """Give seq its own copy of the block its next token goes into, if that is shared.

        Returns:
            (src, dst) for the runner to copy the K/V of (kv_cache_copy), or None.
        """
        idx = self._shared_write_block(seq)
        if idx is None:
            return None
        src = seq.block_table[idx]
        dst = self._take_free_block()
        self.blocks[src].ref_count -= 1  # was > 1, so it stays owned
        seq.block_table[idx] = dst
        return src, dst

    # ---- internals ------------------------------------------------------------------

    def _shared_write_block(self, seq) -> int | None:
        """Index in seq.block_table of the block the next token is written to, if shared."""
        idx = seq.num_computed_tokens // self.block_size
        if idx < len(seq.block_table) and self.blocks[seq.block_table[idx]].ref_count > 1:
            return idx
        return None

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        """The least recently freed block, evicted from the cache, with one owner."""
        if not self.free_queue:
            raise RuntimeError("BlockManager: no free block")
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
