"""The packed batch one forward step runs over (see DESIGN.md, "One step, one packed batch")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ForwardBatch:
    token_ids: np.ndarray        # [num_tokens] int32: new tokens of every sequence, concatenated
    positions: np.ndarray        # [num_tokens] int32: their positions in their sequences
    slot_mapping: np.ndarray     # [num_tokens] int32: block_idx * block_size + offset for each new K/V
    query_start_loc: np.ndarray  # [num_seqs + 1] int32: where each sequence's new tokens start
    seq_lens: np.ndarray         # [num_seqs] int32: cached + new tokens of each sequence
    block_tables: np.ndarray     # [num_seqs, max_blocks] int32: physical blocks, -1 past the end
    logits_indices: np.ndarray   # [num_seqs] int32: the rows that reach the LM head

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class KVCache:
    """One layer's paged cache: [num_blocks, block_size, num_kv_heads, head_dim] for K and V."""
    k: np.ndarray
    v: np.ndarray

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype=np.float32, device: str = "cpu"):
        """Zeroed K and V caches (float32, bfloat16 or, on the CPU, float16).

        On the CPU every page is written once here, as llama.cpp clears its KV buffer at
        start: a page's first write is a page fault (about 8 us for 4 KiB on these VMs), which
        decode would otherwise pay block by block (SmolLM2, 16 sequences: 25 -> 19 ms a step).
        """
        from engine import ops

        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k, v = ops.zeros(shape, dtype, device), ops.zeros(shape, dtype, device)
        if device == "cpu":
            k.fill(0)
            v.fill(0)
        return cls(k, v)
