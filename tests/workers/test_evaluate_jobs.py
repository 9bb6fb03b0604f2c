"""`kind: evaluate` jobs run on the workers like training jobs (issue 15 part 4): a trained
job's checkpoint over a file, window by window with carried state, its metrics and summary
stored like a run's. Run without Ray: the runner is called as a Ray worker would call it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.store.db import repo, states
from service.store.db.models import JobState
from workers.attempt import AttemptSpec
from workers.runner import run_attempt

CORPUS = "the cat sat on the mat. the dog sat on the log.\n\n" * 60


def _run(stack, job_id: str) -> str:
    with stack.sessions.begin() as session:
        assert states.claim(session, job_id, "host", lease_seconds=60) == 1
    spec = AttemptSpec(job_id=job_id, attempt=1, worker="host", database_url=stack.database_url,
                       redis_url=stack.redis_url, artifacts=str(stack.artifacts), lease_seconds=60, prefix=stack.prefix)
    return run_attempt(spec)


def _series(stack, job_id: str) -> dict[str, list]:
    with stack.sessions.begin() as session:
        return repo.read_series(session, job_id, names=["valid/loss", "valid/ppl", "valid/bpc"])


def test_an_evaluate_job_reproduces_the_last_validation_of_the_trained_job(stack, tmp_path: Path):
    train_file, valid_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text(CORPUS)
    valid_file.write_text("the mat sat on the cat.\n\nthe log sat on the dog.\n\n" * 8)
    trained = stack.submit({
        "model": {"hidden_size": 16},
        "data": {"kind": "text", "path": str(train_file), "valid_path": str(valid_file), "batch_size": 4},
        "tbptt": {"k1": 16},
        "train": {"max_steps": 40, "eval_every": 20, "checkpoint_every": 20, "device": "cpu"},
    }, enqueue=False)
    assert _run(stack, trained) == "succeeded"
    last_valid = _series(stack, trained)["valid/loss"][-1]
    assert last_valid[0] == 40
    # the completed run's model artifact is stored and recorded in its summary (issue 15 part 1)
    model = stack.job(trained).summary["model"]
    assert (model["step"], model["selected"]) == (40, "last")
    stored = Path(model["uri"].removeprefix("file://"))
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == model["sha256"] and stored.stat().st_size == model["bytes"]

    valid_file.rename(tmp_path / "moved.txt")  # the training data is gone: the checkpoint is enough
    train_file.unlink()
    evaluation = stack.submit({
        "kind": "evaluate",
        "evaluate": {"job": trained, "step": 40},
        "data": {"kind": "text", "path": str(tmp_path / "moved.txt")},
        "train": {"device": "cpu"},
    }, enqueue=False)
    assert _run(stack, evaluation) == "succeeded"
    job = stack.job(evaluation)
    assert job.state == JobState.SUCCEEDED and job.summary["stopped"] == "completed"
    series = _series(stack, evaluation)
    (step, loss), = series["valid/loss"]
    assert step == 40 and abs(loss - last_valid[1]) < 1e-6
    assert abs(job.summary["final_valid_loss"] - last_valid[1]) < 1e-6 and series["valid/bpc"]

    # a checkpoint that is not there (pruned, or never written) fails the job, naming why
    missing = stack.submit({**stack.job(evaluation).config, "evaluate": {"job": trained, "step": 7}}, enqueue=False)
    assert _run(stack, missing) == "failed"
    assert "evaluate.step" in stack.job(missing).error
