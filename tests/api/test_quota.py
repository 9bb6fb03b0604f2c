"""The queued-jobs cap's estimate (service.quota): recounts are single-flight, exact at the
edge, and a failed or abandoned recount does not strand the requests waiting on it."""

from __future__ import annotations

import asyncio

import pytest

from service.quota import OverQuota, QueuedCounter


class SlowCount:
    def __init__(self, queued: int, fail: BaseException | None = None) -> None:
        self.queued, self.fail, self.calls = queued, fail, 0

    async def __call__(self, project_id: str) -> int:
        self.calls += 1
        await asyncio.sleep(0.05)
        if self.fail is not None:
            raise self.fail
        return self.queued


async def test_concurrent_requests_share_one_recount():
    quota, count = QueuedCounter(ttl_s=60), SlowCount(5)
    await asyncio.gather(*(quota.check("p", 1, 100, count) for _ in range(50)))
    assert count.calls == 1
    quota.added("p", 1)
    await quota.check("p", 1, 100, count)  # fresh and far from the limit: no count
    assert count.calls == 1


async def test_near_the_limit_every_check_counts_and_refuses_exactly():
    quota, count = QueuedCounter(ttl_s=60), SlowCount(9)
    await quota.check("p", 1, 10, count)  # 9 + 1 <= 10
    with pytest.raises(OverQuota):
        await quota.check("p", 2, 10, count)
    assert count.calls == 2  # within the slack: counted again


async def test_a_failed_recount_fails_its_waiters_and_the_next_one_counts_again():
    quota, count = QueuedCounter(ttl_s=60), SlowCount(1, fail=ConnectionError("db down"))
    results = await asyncio.gather(*(quota.check("p", 1, 100, count) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results) and count.calls == 1
    count.fail = None
    await quota.check("p", 1, 100, count)
    assert count.calls == 2


async def test_waiters_count_themselves_when_the_counting_request_is_cancelled():
    quota, count = QueuedCounter(ttl_s=60), SlowCount(1)
    first = asyncio.create_task(quota.check("p", 1, 100, count))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(quota.check("p", 1, 100, count))
    await asyncio.sleep(0.01)
    first.cancel()
    await waiter  # not stranded, not cancelled
    assert first.cancelled() and count.calls == 2
