"""The server's embedding worker in-process: concurrent jobs batched and answered with their
own rows, shutdown, and the serve options it refuses."""

import asyncio

import numpy as np
import pytest

from engine.cli import main as cli
from engine.server.embed_worker import EmbeddingWorker, WorkerStopped


@pytest.fixture(scope="module")
def worker(minilm_path):
    worker = EmbeddingWorker.load(minilm_path, {})
    yield worker
    worker.shutdown()


def test_concurrent_jobs_are_batched_and_each_gets_its_rows(worker):
    texts = [[f"job {j} text {k}" for k in range(j + 1)] for j in range(6)]
    jobs = [worker.runner.tokenize(t) for t in texts]
    before = worker.num_batches

    async def submit_all():
        return await asyncio.gather(*(worker.embed(ids) for ids in jobs))

    results = asyncio.run(submit_all())
    for ids, got in zip(jobs, results):
        assert got.shape == (len(ids), 384)
        np.testing.assert_allclose(got, worker.runner.embed_token_ids(ids), atol=1e-5)
    assert worker.num_batches - before < len(jobs)  # queued together, run together
    assert worker.total_prompt_tokens >= sum(len(i) for ids in jobs for i in ids)
    assert worker.live()["num_waiting"] == 0


def test_shutdown_refuses_new_jobs(minilm_path):
    worker = EmbeddingWorker.load(minilm_path, {"max_model_len": 64})
    assert worker.is_running and worker.runner.max_input_len == 64
    worker.shutdown()
    worker.shutdown()  # idempotent
    assert not worker.is_running
    with pytest.raises(WorkerStopped):
        asyncio.run(worker.embed([[101, 102]]))


def test_generation_only_options_are_refused(minilm_path, tmp_path, capsys):
    with pytest.raises(ValueError, match="--num-kv-blocks"):
        EmbeddingWorker.load(minilm_path, {"num_kv_blocks": 8})
    status = cli(["serve", minilm_path, "--data-dir", str(tmp_path), "--max-num-seqs", "4"])
    assert status == 2
    assert "embedding model" in capsys.readouterr().err
