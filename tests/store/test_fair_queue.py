"""Fair share in the dispatch queue (real Redis): priority first; within a priority the
project with the smallest share; projects held back (at their quota) stay pending in place."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from service.store.queue import JobQueue

pytestmark = pytest.mark.redis

LEASE = 60.0


@pytest.fixture
def queue(redis_client: aioredis.Redis, redis_prefix: str) -> JobQueue:
    return JobQueue(redis_client, prefix=redis_prefix)


async def take(queue: JobQueue, **choice) -> str | None:
    job = await queue.dequeue("c", LEASE, block_s=0, **choice)
    if job is not None:
        assert await queue.ack(job, "c")
    return job


async def test_within_a_priority_the_smallest_share_goes_first(queue: JobQueue) -> None:
    # A floods first; B's one job, submitted last, is next because A already holds half.
    await queue.enqueue_many([(f"a{i}", 0, "A") for i in range(500)])
    await queue.enqueue("b0", 0, "B")
    assert await take(queue, shares={"A": 0.5}) == "b0"
    assert await take(queue, shares={"A": 0.5, "B": 0.5}) == "a0"  # equal shares: the oldest


async def test_a_project_not_named_has_share_zero(queue: JobQueue) -> None:
    await queue.enqueue_many([("a0", 0, "A"), ("b0", 0, "B")])
    assert await take(queue, shares={"A": 0.25}) == "b0"


async def test_priority_comes_before_fair_share(queue: JobQueue) -> None:
    await queue.enqueue_many([("b-low", 0, "B"), ("a-high", 5, "A")])
    assert await take(queue, shares={"A": 0.9, "B": 0.0}) == "a-high"


async def test_fifo_without_shares_across_projects(queue: JobQueue) -> None:
    await queue.enqueue_many([("x", 1, "A"), ("y", 1, "B"), ("z", 1, "A"), ("w", 2, "C")])
    assert [await take(queue) for _ in range(4)] == ["w", "x", "y", "z"]


async def test_held_projects_stay_pending_in_place(queue: JobQueue) -> None:
    await queue.enqueue_many([("a0", 9, "A"), ("a1", 9, "A"), ("b0", 0, "B")])
    assert await take(queue, held=["A"]) == "b0"
    assert await take(queue, held=["A"]) is None
    assert await queue.depth() == {9: 2}
    assert await take(queue) == "a0"  # no longer held: its jobs in their order
    assert await take(queue) == "a1"


async def test_release_reclaim_and_remove_keep_the_projects_queues(queue: JobQueue) -> None:
    await queue.enqueue_many([("a0", 0, "A"), ("a1", 0, "A"), ("b0", 0, "B")])
    assert await queue.dequeue("c", LEASE, block_s=0) == "a0"
    assert await queue.release("a0", "c", 0)  # back to A's queue, behind a1
    assert await queue.remove("b0")  # gone from B's queue too: never delivered
    assert await queue.dequeue("short", 0.05, block_s=0, held=["B"]) == "a1"
    await asyncio.sleep(0.3)  # a1's lease expires: reclaimed into A's queue with its place, ahead of a0
    assert await queue.dequeue("c", LEASE, block_s=0, held=["B"]) == "a1"
    assert await queue.ack("a1", "c")
    assert await take(queue) == "a0"
    assert await take(queue) is None
    assert await queue.depth() == {}


async def test_shares_must_be_finite(queue: JobQueue) -> None:
    with pytest.raises(ValueError):
        await queue.dequeue("c", LEASE, block_s=0, shares={"A": float("nan")})
