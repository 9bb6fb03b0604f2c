"""The model's size is checked on the model as built (issue 14): a text job's vocabulary is
known only once the worker reads its data, so the API's estimate leaves the embedding and
output layers out, and on c069bd3 such a job trained whatever its real size."""

from __future__ import annotations

import pytest

from service.store.db.models import JobState
from trainer.config import parameter_count, parse_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CAP = 20_000


def text_job(path: str) -> dict:
    return {
        "model": {"cell": "lstm", "hidden_size": 16, "embedding_dim": 16},
        "data": {"kind": "text", "path": path, "tokenizer": "word", "batch_size": 2},
        "tbptt": {"k1": 8},
        "train": {"max_steps": 3, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"},
        "max_attempts": 3,
    }


def test_a_model_over_the_cap_with_its_vocabulary_fails_before_training(stack, tmp_path):
    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(f"w{i}" for i in range(2000)) * 3 + "\n")
    config = text_job(str(corpus))
    assert parameter_count(parse_config(config)) < CAP  # what the API can see: under the cap
    job_id = stack.submit(config)
    stack.start_worker(UNROLL_MAX_PARAMS=str(CAP))
    job = stack.wait(job_id, {JobState.SUCCEEDED, JobState.FAILED}, timeout=120)
    assert job.state == JobState.FAILED, job.error
    assert "UNROLL_MAX_PARAMS" in job.error and "parameters with its data's vocabulary" in job.error
    assert job.attempt == 1 and job.step == 0  # a job error: not retried, no update made
