"""GPU steps: one copy of each step's inputs, and decode steps replayed as CUDA graphs.

Every step's int32 inputs (token ids, positions, slots, sequence bounds, block tables)
are written into one host array and copied to one device array in a single transfer;
the model reads views of it. Decode steps (one new token per sequence) of up to the
largest graph size are padded to the next captured batch size and replayed as a CUDA
graph, which launches the whole forward at once. Padded rows are sequences of one
token in a KV block that no real sequence owns, so they touch nothing real.
"""

from __future__ import annotations

import numpy as np

from engine import ops
from engine.model.batch import ForwardBatch

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def graph_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes captured for a runner of max_num_seqs (max_num_seqs always one)."""
    sizes = [b for b in GRAPH_BATCH_SIZES if b < max_num_seqs]
    return sizes + [max_num_seqs]


class CudaSteps:
    """Stages each step's inputs on the GPU and runs the forward, eagerly or as a graph.

    Args:
        model: a model on the GPU (forward(batch, kv_caches, workspace)).
        kv_caches: the layers' caches; block `dummy_block` belongs to no sequence.
        workspace: the GPU workspace the forward writes into.
        block_size, max_num_tokens, max_num_seqs, max_blocks_per_seq: the runner's sizes.
        use_graphs: capture decode steps as CUDA graphs (else every step runs eagerly).
    """

    def __init__(self, model, kv_caches, workspace, dummy_block: int, block_size: int,
                 max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 use_graphs: bool = True):
        self.model, self.kv_caches, self.workspace = model, kv_caches, workspace
        self.dummy_slot = dummy_block * block_size
        self.dummy_block = dummy_block
        self.max_blocks = max_blocks_per_seq
        t, s = max_num_tokens, max_num_seqs
        sizes = {"token_ids": t, "positions": t, "slot_mapping": t,
                 "query_start_loc": s + 1, "seq_lens": s, "logits_indices": s,
                 "block_tables": s * max_blocks_per_seq}
        self._offsets, total = {}, 0
        for name, size in sizes.items():
            self._offsets[name] = total
            total += size
        self._host = np.zeros(total, np.int32)
        self._device = ops.to_device(self._host)
        self.graphs: dict[int, object] = {}
        if use_graphs:
            self._capture(graph_sizes(min(max_num_seqs, max_num_tokens)))

    # ---- inputs ---------------------------------------------------------------------

    def _views(self, buf, num_tokens: int, num_seqs: int) -> ForwardBatch:
        def part(name, n):
            o = self._offsets[name]
            return buf[o:o + n]

        tables = part("block_tables", num_seqs * self.max_blocks).reshape(num_seqs,
                                                                            self.max_blocks)
        return ForwardBatch(token_ids=part("token_ids", num_tokens),
                            positions=part("positions", num_tokens),
                            slot_mapping=part("slot_mapping", num_tokens),
                            query_start_loc=part("query_start_loc", num_seqs + 1),
                            seq_lens=part("seq_lens", num_seqs), block_tables=tables,
                            logits_indices=part("logits_indices", num_seqs))

    def _stage(self, batch: ForwardBatch, num_tokens: int, num_seqs: int) -> ForwardBatch:
        """Copy batch to the GPU, padded with one-token dummy sequences up to num_seqs."""
        t, s = batch.num_tokens, batch.num_seqs
        pad = num_seqs - s
        assert num_tokens - t == pad >= 0
        h = self._views(self._host, num_tokens, num_seqs)
        h.token_ids[:t], h.token_ids[t:] = batch.token_ids, 0
        h.positions[:t], h.positions[t:] = batch.positions, 0
        h.slot_mapping[:t], h.slot_mapping[t:] = batch.slot_mapping, self.dummy_slot
        h.query_start_loc[:s + 1] = batch.query_start_loc
        h.query_start_loc[s + 1:] = t + np.arange(1, pad + 1, dtype=np.int32)
        h.seq_lens[:s], h.seq_lens[s:] = batch.seq_lens, 1
        h.logits_indices[:s] = batch.logits_indices
        h.logits_indices[s:] = t + np.arange(pad, dtype=np.int32)
        h.block_tables[:s] = batch.block_tables
        h.block_tables[s:] = -1
        h.block_tables[s:, 0] = self.dummy_block
        self._device.copy_from(self._host)
        return self._views(self._device, num_tokens, num_seqs)

    # ---- forward --------------------------------------------------------------------

    def forward(self, batch: ForwardBatch):
        """Logits [num_seqs, vocab] on the GPU for batch (a host ForwardBatch)."""
        t, s = batch.num_tokens, batch.num_seqs
        size = self._graph_size(s) if t == s else None
        if size is None:
            return self.model.forward(self._stage(batch, t, s), self.kv_caches, self.workspace)
        self._stage(batch, size, size)
        self.graphs[size].replay()
        return self.workspace.logits[:s]

    def _graph_size(self, num_seqs: int) -> int | None:
        for size in self.graphs:  # ascending
            if size >= num_seqs:
                return size
        return None

    def _capture(self, sizes: list[int]) -> None:
        """Run each size once eagerly (kernels size their scratch, set their attributes),
        then capture each; graphs keep ascending order for _graph_size."""
        from engine import _C_cuda

        empty = ForwardBatch(*(np.zeros(0, np.int32) for _ in range(3)),
                             query_start_loc=np.zeros(1, np.int32), seq_lens=np.zeros(0, np.int32),
                             block_tables=np.zeros((0, self.max_blocks), np.int32),
                             logits_indices=np.zeros(0, np.int32))
        for size in reversed(sizes):
            self.model.forward(self._stage(empty, size, size), self.kv_caches, self.workspace)
        ops.synchronize()
        captured = {}
        for size in reversed(sizes):
            graph = _C_cuda.Graph()
            batch = self._stage(empty, size, size)
            graph.capture_begin()
            try:
                self.model.forward(batch, self.kv_caches, self.workspace)
            finally:
                graph.capture_end()
            captured[size] = graph
        ops.synchronize()
        self.graphs = dict(sorted(captured.items()))
