"""Several dispatchers claiming at once: every job is claimed exactly once."""

from __future__ import annotations

import threading
from collections import Counter

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db import states
from service.store.db.session import make_engine

from .conftest import make_job

JOBS = 50
CLAIMERS = 4


def test_concurrent_claimers_claim_each_job_once(session: Session, db_url: str) -> None:
    ids = {make_job(session, priority=i % 3).id for i in range(JOBS)}
    engine = make_engine(db_url, pool_size=CLAIMERS) if db_url.startswith("postgres") else make_engine(db_url)
    claimed: list[tuple[str, str, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(CLAIMERS)
    errors: list[BaseException] = []

    def claimer(worker: str) -> None:
        try:
            start.wait()
            while True:
                # each claim is its own transaction, on this thread's own connection
                with Session(engine) as s, s.begin():
                    claim = states.claim_next(s, worker, 30)
                if claim is None:
                    return
                with lock:
                    claimed.append((claim.job_id, worker, claim.attempt))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(CLAIMERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.dispose()
    assert not errors, errors
    counts = Counter(job_id for job_id, _, _ in claimed)
    assert set(counts) == ids
    assert max(counts.values()) == 1, [j for j, n in counts.items() if n > 1]
    assert {attempt for _, _, attempt in claimed} == {1}
    # the database agrees: one attempt row per job, owned by the thread that claimed it
    session.expire_all()
    rows = session.execute(sa.text("SELECT job_id, worker FROM attempts")).all()
    assert sorted(rows) == sorted((job_id, worker) for job_id, worker, _ in claimed)


def test_concurrent_claims_of_one_job(session: Session, db_url: str) -> None:
    """Many claimers racing for the same job id (the queue delivered it twice)."""
    job = make_job(session)
    engine = make_engine(db_url)
    results: list[int | None] = []
    start = threading.Barrier(CLAIMERS)

    def claimer(worker: str) -> None:
        start.wait()
        with Session(engine) as s, s.begin():
            results.append(states.claim(s, job.id, worker, 30))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(CLAIMERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.dispose()
    assert sorted(results, key=lambda r: r or 0) == [None] * (CLAIMERS - 1) + [1]
