"""Turns the scheduler's decisions into one packed batch, runs the model, samples.

The runner owns the KV caches and the activation workspace, both sized once
at start-up. Sequences come in; token ids (one per sequence that finished its
prompt in this step) come out.
"""

from __future__ import annotations

import itertools

import numpy as np

from engine import ops
from engine.model.batch import ForwardBatch, KVCache
from engine.sampler import prompt_logprobs


class ModelRunner:
    """Owns the KV caches and the workspace; runs one step's batch through model and sampler."""

    def __init__(self, model, sampler, num_blocks: int, block_size: int,
                 max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                 workspace_cls, kv_cache_dtype=np.float32, use_cuda_graphs: bool = True):
        c = model.config
        self.model = model
        self.sampler = sampler
        self.block_size = block_size
        self.device = getattr(model, "device", "cpu")
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        # On the GPU one more block, owned by no sequence, takes the padded rows of graphs.
        num_cache_blocks = num_blocks + (self.device == "cuda")
        self.kv_caches = [KVCache.allocate(num_cache_blocks, block_size, c.num_kv_heads,
                                           c.head_dim, kv_cache_dtype, self.device)
                          for _ in range(c.num_layers)]
        self.workspace = workspace_cls(c, max_num_batched_tokens, max_num_seqs, self.device)
        self.cuda_steps = None
        if self.device == "cuda":
            from engine.cuda_steps import CudaSteps

            self.cuda_steps = CudaSteps(model, self.kv_caches, self.workspace, num_blocks,
                                        block_size, max_num_batched_tokens, max_num_seqs,
                                        self.max_blocks_per_seq, use_cuda_graphs)

    def execute(self, scheduled: list[tuple[object, int]], copies: list[tuple[int, int]] = ()):
        """Run one step over [(sequence, num_new_tokens), ...] after copying KV blocks.

        Returns:
            SamplerOutput: one token per sequence (meaningless for a sequence whose
            prompt is not yet fully computed after this step).
        """
        if copies:
            src = np.array([c[0] for c in copies], np.int32)
            dst = np.array([c[1] for c in copies], np.int32)
            if self.device == "cuda":
                src, dst = ops.to_device(src), ops.to_device(dst)
            for cache in self.kv_caches:
                ops.kv_cache_copy(cache.k, cache.v, src, dst)
        batch = self.build_batch(scheduled)
        if self.cuda_steps is not None:
            logits = self.cuda_steps.forward(batch)
        else:
            logits = self.model.forward(batch, self.kv_caches, self.workspace)
        seqs = [seq for seq, _ in scheduled]
        for i, (seq, n) in enumerate(scheduled):
            if seq.params.prompt_logprobs is not None:
                self._prompt_logprobs(seq, int(batch.query_start_loc[i]), n)
        is_sampled = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in scheduled]
        return self.sampler(logits, seqs, is_sampled)

    def _prompt_logprobs(self, seq, row0: int, n: int, rows_per_pass: int = 256) -> None:
        """Append to seq.prompt_logprobs the logprob of each prompt token this chunk predicts
        (position p's logits score token p + 1), each position once even after preemption."""
        first = seq.num_computed_tokens
        begin = max(first, len(seq.prompt_logprobs))
        end = min(first + n, seq.num_prompt_tokens - 1)
        k = seq.params.prompt_logprobs
        vocab = self.model.config.vocab_size
        for p0 in range(begin, end, rows_per_pass):
            p1 = min(end, p0 + rows_per_pass)
            rows = np.arange(row0 + p0 - first, row0 + p1 - first)
            out = ops.empty((len(rows), vocab), np.float32, self.device)
            logits = ops.to_host(self.model.logits_for_rows(self.workspace, rows, out))
            next_ids = np.asarray(seq.token_ids[p0 + 1:p1 + 1], np.int32)
            for lp in prompt_logprobs(logits, next_ids, k):
                seq.prompt_logprobs.append({lp.token_id: lp.logprob, **dict(lp.top)})

    def build_batch(self, scheduled) -> ForwardBatch:
        """The packed arrays of one step, built with a few numpy calls over all sequences
        (per-sequence Python is what bounds large decode batches on the GPU)."""
        num_seqs = len(scheduled)
        bs = self.block_size
        firsts = np.fromiter((seq.num_computed_tokens for seq, _ in scheduled), np.int32, num_seqs)
        counts = np.fromiter((n for _, n in scheduled), np.int32, num_seqs)
        query_start_loc = np.zeros(num_seqs + 1, np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        seq_lens = firsts + counts
        # token i of the batch belongs to sequence seq_idx[i], at position first + offset
        seq_idx = np.repeat(np.arange(num_seqs, dtype=np.int32), counts)
        positions = (np.repeat(firsts - query_start_loc[:-1], counts)
                     + np.arange(num_tokens, dtype=np.int32)).astype(np.int32)
        if num_tokens == num_seqs:  # decode: one token each
            token_ids = np.fromiter((seq.token_ids[seq.num_computed_tokens]
                                     for seq, _ in scheduled), np.int32, num_seqs)
        else:
            token_ids = np.fromiter(itertools.chain.from_iterable(
                seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]
                for seq, n in scheduled), np.int32, num_tokens)
        table_lens = np.fromiter((len(seq.block_table) for seq, _ in scheduled), np.int64,
                                 num_seqs)
        block_tables = np.full((num_seqs, self.max_blocks_per_seq), -1, np.int32)
        block_tables[np.arange(self.max_blocks_per_seq) < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(seq.block_table for seq, _ in scheduled), np.int32,
            int(table_lens.sum()))
        slot_mapping = (block_tables[seq_idx, positions // bs] * bs + positions % bs
                        ).astype(np.int32)
        return ForwardBatch(token_ids=token_ids, positions=positions, slot_mapping=slot_mapping,
                            query_start_loc=query_start_loc, seq_lens=seq_lens.astype(np.int32),
                            block_tables=block_tables,
                            logits_indices=query_start_loc[1:] - 1)
