"""One attempt of one job, run as a Ray task: open it, resume, train, report, finish. A job
with `resources.workers` > 1 runs as a data-parallel group instead (workers/ddp.py); this
task only drives it. What both share is in workers/attempt.py."""

from __future__ import annotations

from service.store.keys import Keys
from trainer import evaluation
from workers import tracking
from workers.attempt import (
    AttemptEnded,
    AttemptSpec,
    gpus_as_reserved,
    open_attempt,
    service_checks,
    train_attempt,
)
from workers.ddp import run_group_attempt
from workers.preemption import PreemptStop
from workers.reporter import JobReporter, current_node
from workers.rungs import rung_stops


def warm_up() -> None:
    """Ray's worker_process_setup_hook: import the heavy modules before the first job."""
    import torch  # noqa: F401

    import trainer.loop  # noqa: F401


def run_attempt(spec: AttemptSpec) -> str:
    """Run the attempt to its end; returns the state it wrote (or "stale").

    Raises for infrastructure failures (the dispatcher retries the job from its last
    checkpoint); job errors end the job as failed here. An attempt without GPUs reserved
    sees none while it runs (workers.attempt.gpus_as_reserved).
    """
    try:
        job = open_attempt(spec)
    except AttemptEnded as ended:
        return ended.outcome
    with gpus_as_reserved(job.config) as config:
        if config.kind == "evaluate":
            reporter = JobReporter(job.attempt)
            checks = [*service_checks(spec), reporter]
            return train_attempt(reporter, lambda: evaluation.run(config, job.evaluated_checkpoint(), checks, job.resolve))
        if config.resources.workers > 1:
            return run_group_attempt(spec, config)
        resume = job.load_checkpoint()
        reporter = JobReporter(job.attempt)
        # fit, plus MLflow / TensorBoard when this node's environment asks for them
        preempt = PreemptStop(job.attempt.redis, Keys(spec.prefix), spec.job_id, spec.attempt, node_id=current_node())
        callbacks = [*service_checks(spec), *rung_stops(job.attempt, spec.job_id, reporter.log), preempt, reporter]
        return train_attempt(
            reporter,
            lambda: preempt.hand_back(
                reporter, tracking.fit(spec.job_id, spec.attempt, config, callbacks, resume=resume, resolve=job.resolve)
            ),
        )
