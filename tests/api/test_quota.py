"""The queued-jobs cap's estimate (service.api.quota): recounts are single-flight, exact at the
edge, a stale estimate far from the limit is refreshed without holding requests, and a
failed or abandoned recount does not strand the requests waiting on it."""

from __future__ import annotations

import asyncio

import pytest

from service.api.quota import OverQuota, QueuedCounter


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
    count = SlowCount(5)
    quota = QueuedCounter(count, ttl_s=60)
    await asyncio.gather(*(quota.check("p", 1, 100) for _ in range(50)))
    assert count.calls == 1
    quota.added("p", 1)
    await quota.check("p", 1, 100)  # fresh and far from the limit: no count
    assert count.calls == 1


async def test_near_the_limit_every_check_counts_and_refuses_exactly():
    count = SlowCount(9)
    quota = QueuedCounter(count, ttl_s=60)
    await quota.check("p", 1, 10)  # 9 + 1 <= 10
    with pytest.raises(OverQuota):
        await quota.check("p", 2, 10)
    assert count.calls == 2  # within the slack: counted again


async def test_a_failed_recount_fails_its_waiters_and_the_next_one_counts_again():
    count = SlowCount(1, fail=ConnectionError("db down"))
    quota = QueuedCounter(count, ttl_s=60)
    results = await asyncio.gather(*(quota.check("p", 1, 100) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results) and count.calls == 1
    count.fail = None
    await quota.check("p", 1, 100)
    assert count.calls == 2


async def test_waiters_count_themselves_when_the_counting_request_is_cancelled():
    count = SlowCount(1)
    quota = QueuedCounter(count, ttl_s=60)
    first = asyncio.create_task(quota.check("p", 1, 100))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(quota.check("p", 1, 100))
    await asyncio.sleep(0.01)
    first.cancel()
    await waiter  # not stranded, not cancelled
    assert first.cancelled() and count.calls == 2


async def test_a_count_inside_the_callers_transaction_is_used_when_given():
    own, callers = SlowCount(1), SlowCount(2)
    quota = QueuedCounter(own, ttl_s=60)
    await quota.check("p", 8, 10, callers)  # 2 + 8 <= 10
    with pytest.raises(OverQuota):
        await quota.check("p", 9, 10, callers)
    assert (own.calls, callers.calls) == (0, 2)


async def test_a_stale_estimate_far_from_the_limit_is_refreshed_while_requests_go_on():
    count = SlowCount(5)
    quota = QueuedCounter(count, ttl_s=0.01)
    await quota.check("p", 1, 100)
    await asyncio.sleep(0.02)  # stale now
    count.queued = 7
    await asyncio.gather(*(quota.check("p", 1, 100) for _ in range(20)))
    assert "p" in quota._counting  # all answered while the count still runs
    assert count.calls == 2  # one refresh for all of them
    await asyncio.sleep(0.1)
    assert quota._estimates["p"][0] == 7


async def test_jobs_added_while_a_count_runs_are_not_lost():
    count = SlowCount(3)
    quota = QueuedCounter(count, ttl_s=60)
    counting = asyncio.create_task(quota.check("p", 1, 100))
    await asyncio.sleep(0.01)
    quota.added("p", 4)  # committed by requests that had passed their check already
    await counting
    assert quota._estimates["p"][0] == 7


async def test_a_failed_refresh_is_logged_and_the_next_stale_check_tries_again(caplog):
    count = SlowCount(5)
    quota = QueuedCounter(count, ttl_s=0.01)
    await quota.check("p", 1, 100)
    await asyncio.sleep(0.02)
    count.fail = ConnectionError("db down")
    await quota.check("p", 1, 100)  # answered from the estimate; the refresh fails behind it
    await asyncio.sleep(0.1)
    assert "db down" in caplog.text and count.calls == 2
    count.fail, count.queued = None, 6
    await quota.check("p", 1, 100)
    await asyncio.sleep(0.1)
    assert count.calls == 3 and quota._estimates["p"][0] == 6


async def test_refusals_are_decided_on_the_count_itself():
    count = SlowCount(8)
    quota = QueuedCounter(count, ttl_s=60)
    checking = asyncio.create_task(quota.check("p", 2, 10))
    await asyncio.sleep(0.01)
    quota.added("p", 1)  # another request's job, which the count may already include
    await checking  # 8 counted + 2 fits, though the estimate after the count says 9


async def test_a_failed_refresh_waits_ttl_before_the_next_one():
    count = SlowCount(5)
    quota = QueuedCounter(count, ttl_s=0.5)
    await quota.check("p", 1, 100)
    await asyncio.sleep(0.55)
    count.fail = ConnectionError("db down")
    await quota.check("p", 1, 100)
    await asyncio.sleep(0.1)  # the refresh has failed
    await quota.check("p", 1, 100)  # not stale again yet: no new count
    await asyncio.sleep(0.01)  # (a refresh it started would have called count by now)
    assert count.calls == 2


async def test_close_stops_a_running_refresh():
    count = SlowCount(5)
    quota = QueuedCounter(count, ttl_s=0.01)
    await quota.check("p", 1, 100)
    await asyncio.sleep(0.02)
    await quota.check("p", 1, 100)
    assert quota._refreshes
    await quota.close()
    assert not quota._refreshes and "p" not in quota._counting
    await asyncio.sleep(0.02)
    await quota.check("p", 1, 100)  # stale, but closed: no refresh starts
    assert not quota._refreshes
