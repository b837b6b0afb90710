"""Turns the scheduler's decisions into one packed batch, runs the model, samples.

The runner owns the KV caches and the activation workspace, both sized once
at start-up. Sequences come in; token ids (one per sequence that finished its
prompt in this step) come out.
"""

from __future__ import annotations

import numpy as np

from engine import ops
from engine.model.batch import ForwardBatch, KVCache


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int, workspace_cls):
        c = model.config
        self.model = model
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_caches = [KVCache.allocate(num_blocks, block_size, c.num_kv_heads, c.head_dim)
                          for _ in range(c.num_layers)]
        self.workspace = workspace_cls(c, max_num_batched_tokens, max_num_seqs)
        self.sampled = np.empty(max_num_seqs, np.int32)

    def execute(self, scheduled: list[tuple[object, int]]) -> np.ndarray:
        """Run one step over [(sequence, num_new_tokens), ...].

        Returns:
            int32 [num_seqs]: the sampled token of each sequence (meaningless for a
            sequence whose prompt is not yet fully computed after this step).
        """
        batch = self.build_batch(scheduled)
        logits = self.model.forward(batch, self.kv_caches, self.workspace)
        is_sampled = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in scheduled]
        return self.sample(logits, [seq for seq, _ in scheduled], is_sampled)

    def build_batch(self, scheduled) -> ForwardBatch:
        num_seqs = len(scheduled)
        num_tokens = sum(n for _, n in scheduled)
        bs = self.block_size
        token_ids = np.empty(num_tokens, np.int32)
        positions = np.empty(num_tokens, np.int32)
        slot_mapping = np.empty(num_tokens, np.int32)
        query_start_loc = np.zeros(num_seqs + 1, np.int32)
        seq_lens = np.empty(num_seqs, np.int32)
        block_tables = np.full((num_seqs, self.max_blocks_per_seq), -1, np.int32)
        start = 0
        for i, (seq, n) in enumerate(scheduled):
            first = seq.num_computed_tokens
            pos = np.arange(first, first + n, dtype=np.int32)
            table = np.asarray(seq.block_table, np.int32)
            token_ids[start:start + n] = seq.token_ids[first:first + n]
            positions[start:start + n] = pos
            slot_mapping[start:start + n] = table[pos // bs] * bs + pos % bs
            block_tables[i, :len(table)] = table
            seq_lens[i] = first + n
            start += n
            query_start_loc[i + 1] = start
        return ForwardBatch(token_ids=token_ids, positions=positions, slot_mapping=slot_mapping,
                            query_start_loc=query_start_loc, seq_lens=seq_lens,
                            block_tables=block_tables,
                            logits_indices=query_start_loc[1:] - 1)

    def sample(self, logits: np.ndarray, seqs, is_sampled: list[bool]) -> np.ndarray:
        """Draw one token per row. Only rows whose sequence keeps its token advance their
        generator, so a sequence's draws never depend on how its prompt was chunked."""
        params = [seq.params for seq in seqs]
        temperature = np.array([p.temperature for p in params], np.float32)
        top_k = np.array([p.top_k for p in params], np.int32)
        top_p = np.array([p.top_p for p in params], np.float32)
        min_p = np.array([p.min_p for p in params], np.float32)
        rng_state = np.array([seq.rng_state for seq in seqs], np.uint64)
        out = self.sampled[:len(seqs)]
        ops.sample(logits, temperature, top_k, top_p, min_p, rng_state, out=out)
        for seq, state, keep in zip(seqs, rng_state.tolist(), is_sampled):
            if keep:
                seq.rng_state = state
        return out
