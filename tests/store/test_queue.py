"""The dispatch queue against a real Redis: order, idempotence, leases, reclaiming, races.

No timing assertions: leases are short (0.2 s) and tests wait for outcomes with generous
deadlines, so a slow shared machine makes them slower, never red."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import redis.asyncio as aioredis

from service.store.keys import Keys
from service.store.queue import ENQUEUE_CHUNK, JobQueue

pytestmark = pytest.mark.redis

SHORT_LEASE = 0.2
LONG_LEASE = 60.0


@pytest.fixture
def queue(redis_client: aioredis.Redis, redis_prefix: str) -> JobQueue:
    return JobQueue(redis_client, prefix=redis_prefix)


async def drain(queue: JobQueue, consumer: str = "c") -> list[str]:
    """Dequeue (and ack) until nothing is pending."""
    jobs = []
    while (job := await queue.dequeue(consumer, LONG_LEASE, block_s=0)) is not None:
        assert await queue.ack(job, consumer)
        jobs.append(job)
    return jobs


async def eventually(check, timeout_s: float = 10.0, every_s: float = 0.05):
    """Poll `check` (async, returns a truthy value when done) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(every_s)


# --- order ----------------------------------------------------------------------------------


async def test_higher_priority_first_fifo_within_a_priority(queue: JobQueue) -> None:
    for job, priority in [("a", 0), ("b", 5), ("c", -3), ("d", 5), ("e", 100), ("f", 0), ("g", -3)]:
        assert await queue.enqueue(job, priority)
    assert await drain(queue) == ["e", "b", "d", "a", "f", "c", "g"]


async def test_fifo_within_one_priority_over_many_messages(queue: JobQueue) -> None:
    ids = [f"job-{i}" for i in range(300)]
    await queue.enqueue_many((job, 7) for job in ids)
    assert await drain(queue) == ids


async def test_extreme_priorities_are_exact(queue: JobQueue) -> None:
    # Neighbours at the edge of a double's integer range still order correctly.
    big = 2**53
    await queue.enqueue_many([("low", -big), ("high-1", big - 1), ("high", big), ("zero", 0)])
    assert await queue.depth() == {-big: 1, big - 1: 1, big: 1, 0: 1}
    assert await drain(queue) == ["high", "high-1", "zero", "low"]


async def test_invalid_arguments_are_refused(queue: JobQueue) -> None:
    with pytest.raises(ValueError):
        await queue.enqueue("x", 2**53 + 1)
    with pytest.raises(TypeError):
        await queue.enqueue("x", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await queue.enqueue("x", True)
    with pytest.raises(ValueError):
        await queue.enqueue("", 0)
    with pytest.raises(ValueError):
        await queue.dequeue("c", lease_s=0)
    with pytest.raises(ValueError):
        await queue.dequeue("", lease_s=1)
    assert not await queue.contains("x")


# --- idempotent enqueue ----------------------------------------------------------------------


async def test_enqueue_is_idempotent_while_pending_or_in_flight(queue: JobQueue) -> None:
    assert await queue.enqueue("j", 3) is True
    assert await queue.enqueue("j", 3) is False
    assert await queue.enqueue("j", 9) is False  # not even a new priority: no duplicate
    assert await queue.depth() == {3: 1}

    assert await queue.dequeue("c", LONG_LEASE, block_s=0) == "j"
    assert await queue.enqueue("j", 3) is False  # in flight: still held
    assert await queue.depth() == {}
    assert await queue.in_flight() == 1
    assert await queue.dequeue("other", LONG_LEASE, block_s=0) is None

    assert await queue.ack("j", "c")
    assert await queue.enqueue("j", 3) is True  # gone: a new message


async def test_enqueue_many_skips_held_and_repeated_ids(queue: JobQueue) -> None:
    await queue.enqueue("held", 0)
    added = await queue.enqueue_many([("a", 1), ("held", 0), ("b", 1), ("a", 1)])
    assert added == [True, False, True, False]
    assert await queue.depth() == {0: 1, 1: 2}


async def test_enqueue_many_beyond_one_chunk(queue: JobQueue) -> None:
    n = 2 * ENQUEUE_CHUNK + 17
    ids = [f"bulk-{i}" for i in range(n)]
    assert await queue.enqueue_many((job, i % 3) for i, job in enumerate(ids)) == [True] * n
    assert await queue.enqueue_many((job, 0) for job in ids[:10]) == [False] * 10
    assert await queue.depth() == dict(Counter(i % 3 for i in range(n)))
    assert await queue.contains_many([ids[0], ids[-1], "nope"]) == [True, True, False]
    assert await queue.enqueue_many([]) == []


# --- leases: at least once -------------------------------------------------------------------


async def test_dead_consumer_message_is_reclaimed_and_delivered_to_another(queue: JobQueue) -> None:
    await queue.enqueue("j", 4)
    assert await queue.dequeue("dead", SHORT_LEASE, block_s=0) == "j"
    # "dead" never acks. Once its lease is over, the message is back, with its priority.
    assert await eventually(queue.reclaim_expired) == ["j"]
    assert await queue.depth() == {4: 1}
    assert await queue.in_flight() == 0
    assert await queue.owner("j") is None

    assert await queue.dequeue("alive", LONG_LEASE, block_s=0) == "j"
    assert await queue.owner("j") == "alive"
    # The dead consumer, back from the grave, can neither ack, renew nor release it.
    assert not await queue.ack("j", "dead")
    assert not await queue.renew("j", "dead", LONG_LEASE)
    assert not await queue.release("j", "dead", 4)
    assert await queue.ack("j", "alive")
    assert not await queue.contains("j")


async def test_reclaimed_message_keeps_its_priority_and_place(queue: JobQueue) -> None:
    await queue.enqueue_many([("first", 1), ("second", 1), ("low", 0)])
    assert await queue.dequeue("dead", SHORT_LEASE, block_s=0) == "first"
    await eventually(queue.reclaim_expired)
    assert await queue.depth() == {1: 2, 0: 1}
    assert await drain(queue) == ["first", "second", "low"]


async def test_dequeue_reclaims_expired_leases_itself(queue: JobQueue) -> None:
    await queue.enqueue("j")
    assert await queue.dequeue("dead", SHORT_LEASE, block_s=0) == "j"
    # No sweeper runs: a consumer that asks for work gets the abandoned message.
    job = await eventually(lambda: queue.dequeue("alive", LONG_LEASE, block_s=0.05))
    assert job == "j"
    assert await queue.owner("j") == "alive"


async def test_waiting_consumer_receives_a_reclaimed_message(queue: JobQueue, make_redis) -> None:
    await queue.enqueue("j")
    assert await queue.dequeue("dead", SHORT_LEASE, block_s=0) == "j"
    waiter = JobQueue(make_redis(), prefix=queue.keys.prefix)
    # One blocking call, long enough to outlive the lease: it comes back with the message.
    assert await waiter.dequeue("alive", LONG_LEASE, block_s=30) == "j"


async def test_renew_keeps_the_lease(queue: JobQueue) -> None:
    await queue.enqueue("j")
    assert await queue.dequeue("c", SHORT_LEASE, block_s=0) == "j"
    assert await queue.renew("j", "c", LONG_LEASE)
    await asyncio.sleep(3 * SHORT_LEASE)  # well past the first lease
    assert await queue.reclaim_expired() == []
    assert await queue.dequeue("other", LONG_LEASE, block_s=0) is None
    assert await queue.owner("j") == "c"
    assert not await queue.renew("j", "other", LONG_LEASE)
    assert not await queue.renew("unknown", "c", LONG_LEASE)


async def test_renewing_repeatedly_outlives_many_short_leases(queue: JobQueue) -> None:
    await queue.enqueue("j")
    assert await queue.dequeue("c", 1.0, block_s=0) == "j"
    for _ in range(10):  # ~1.5 s of heartbeats, each renewing a 1 s lease every 0.15 s
        await asyncio.sleep(0.15)
        assert await queue.renew("j", "c", 1.0)
        assert await queue.owner("j") == "c"


# --- ack, release, remove --------------------------------------------------------------------


async def test_ack_only_by_the_owner(queue: JobQueue) -> None:
    await queue.enqueue("j")
    assert not await queue.ack("j", "c")  # pending: nobody holds it
    assert await queue.dequeue("c", LONG_LEASE, block_s=0) == "j"
    assert not await queue.ack("j", "someone-else")
    assert await queue.contains("j")
    assert await queue.ack("j", "c")
    assert not await queue.ack("j", "c")  # twice: already gone
    assert not await queue.contains("j")
    assert await queue.in_flight() == 0


async def test_release_gives_the_message_back_behind_its_priority(queue: JobQueue) -> None:
    await queue.enqueue_many([("gpu-job", 2), ("cpu-job", 2), ("low", 0)])
    assert await queue.dequeue("c", LONG_LEASE, block_s=0) == "gpu-job"
    assert not await queue.release("gpu-job", "other", 2)
    assert await queue.release("gpu-job", "c", 2)
    assert await queue.in_flight() == 0
    assert await queue.owner("gpu-job") is None
    assert await queue.depth() == {2: 2, 0: 1}
    assert await drain(queue) == ["cpu-job", "gpu-job", "low"]


async def test_remove_pending_and_in_flight(queue: JobQueue) -> None:
    await queue.enqueue_many([("p", 1), ("f", 1), ("keep", 1)])
    assert await queue.dequeue("c", LONG_LEASE, block_s=0) == "p"
    # "p" is in flight, "f" and "keep" pending.
    assert await queue.remove("p")
    assert await queue.remove("f")
    assert not await queue.remove("never-there")
    assert await queue.in_flight() == 0
    assert await queue.depth() == {1: 1}
    assert await queue.contains_many(["p", "f", "keep"]) == [False, False, True]
    assert not await queue.ack("p", "c")  # the consumer of a removed message finds it gone
    assert not await queue.renew("p", "c", LONG_LEASE)
    assert await drain(queue) == ["keep"]


async def test_contains_depth_in_flight(queue: JobQueue) -> None:
    assert await queue.depth() == {}
    assert await queue.in_flight() == 0
    await queue.enqueue_many([("a", 0), ("b", 0), ("c", -1)])
    assert await queue.depth() == {0: 2, -1: 1}
    await queue.dequeue("x", LONG_LEASE, block_s=0)
    await queue.dequeue("x", LONG_LEASE, block_s=0)
    assert await queue.depth() == {-1: 1}
    assert await queue.in_flight() == 2
    assert all(await queue.contains_many(["a", "b", "c"]))
    assert not await queue.contains("d")


async def test_prefixes_isolate_queues(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    one = JobQueue(redis_client, prefix=f"{redis_prefix}:one")
    two = JobQueue(redis_client, prefix=f"{redis_prefix}:two")
    await one.enqueue("j")
    assert not await two.contains("j")
    assert await two.dequeue("c", LONG_LEASE, block_s=0) is None
    assert await one.dequeue("c", LONG_LEASE, block_s=0) == "j"
    assert all(key.startswith(f"{redis_prefix}:one:") for key in Keys(f"{redis_prefix}:one").queue_keys)


# --- races and blocking ----------------------------------------------------------------------


async def test_racing_consumers_get_every_message_exactly_once(queue: JobQueue, make_redis) -> None:
    n, consumers = 200, 6
    ids = [f"job-{i}" for i in range(n)]
    received: list[str] = []
    done = asyncio.Event()

    async def consume(name: str) -> None:
        own = JobQueue(make_redis(), prefix=queue.keys.prefix)  # its own connection pool
        while not done.is_set():
            job = await own.dequeue(name, LONG_LEASE, block_s=0.1)
            if job is None:
                continue
            assert await own.ack(job, name)
            received.append(job)
            if len(received) >= n:
                done.set()

    async def produce() -> None:
        # Messages arrive while consumers race for them: one at a time and in bulk.
        for job in ids[:100]:
            await queue.enqueue(job, priority=hash(job) % 3)
        await queue.enqueue_many((job, 0) for job in ids[100:])

    tasks = [asyncio.create_task(consume(f"consumer-{i}")) for i in range(consumers)]
    await produce()
    await asyncio.wait_for(done.wait(), timeout=60)
    await asyncio.gather(*tasks)
    assert sorted(received) == sorted(ids)  # each once, none lost
    assert await queue.depth() == {}
    assert await queue.in_flight() == 0


async def _wait_until_blocked(client: aioredis.Redis, name: str, count: int = 1) -> None:
    """Until `count` connections named `name` are inside BLPOP on the server."""

    async def blocked() -> bool:
        clients = await client.client_list()
        return sum(1 for c in clients if c.get("name") == name and c.get("cmd") == "blpop") >= count

    await eventually(blocked)


async def test_blocking_dequeue_wakes_on_enqueue(queue: JobQueue, make_redis, redis_prefix: str) -> None:
    name = f"{redis_prefix}-waiter"
    waiter = JobQueue(make_redis(client_name=name), prefix=queue.keys.prefix)
    task = asyncio.create_task(waiter.dequeue("w", LONG_LEASE, block_s=120))
    await _wait_until_blocked(queue.redis, name)
    await queue.enqueue("j", 1)
    # Woken by the enqueue: it returns the message long before its 120 s block ends.
    assert await asyncio.wait_for(task, timeout=20) == "j"
    assert await queue.owner("j") == "w"


async def test_every_waiting_consumer_is_woken(queue: JobQueue, make_redis, redis_prefix: str) -> None:
    name = f"{redis_prefix}-waiters"
    waiters = [JobQueue(make_redis(client_name=name), prefix=queue.keys.prefix) for _ in range(3)]
    tasks = [asyncio.create_task(w.dequeue(f"w{i}", LONG_LEASE, block_s=120)) for i, w in enumerate(waiters)]
    await _wait_until_blocked(queue.redis, name, count=3)
    await queue.enqueue_many([("a", 0), ("b", 0), ("c", 0)])
    got = await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
    assert sorted(got) == ["a", "b", "c"]


async def test_dequeue_times_out_empty(queue: JobQueue) -> None:
    assert await queue.dequeue("c", LONG_LEASE, block_s=0) is None
    assert await queue.dequeue("c", LONG_LEASE, block_s=0.05) is None


async def test_blocking_longer_than_the_socket_timeout(queue: JobQueue, make_redis) -> None:
    # A client with a short socket timeout must not see BLPOP time out under it.
    short = JobQueue(make_redis(socket_timeout=0.3), prefix=queue.keys.prefix)
    assert await short.dequeue("c", LONG_LEASE, block_s=0.8) is None
    await queue.enqueue("j")
    assert await short.dequeue("c", LONG_LEASE, block_s=0.8) == "j"


async def test_works_with_decoded_responses(make_redis, redis_prefix: str) -> None:
    client = make_redis(decode_responses=True)
    queue = JobQueue(client, prefix=redis_prefix)
    try:
        await queue.enqueue("j", -2)
        assert await queue.depth() == {-2: 1}
        assert await queue.dequeue("c", SHORT_LEASE, block_s=0) == "j"
        assert await queue.owner("j") == "c"
        assert await eventually(queue.reclaim_expired) == ["j"]
    finally:
        await client.delete(*Keys(redis_prefix).queue_keys)


# --- losing Redis ----------------------------------------------------------------------------


async def test_a_flushed_or_restarted_redis_serves_the_queue_again(private_redis) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        queue = JobQueue(client)
        await queue.enqueue("a")
        await client.flushall()
        assert not await queue.contains("a")  # lost: the reconciler's business
        assert await queue.enqueue("a")

        private_redis.kill()
        private_redis.start()  # empty, and without our scripts
        for _ in range(5):  # the pooled connection died with the server
            try:
                assert await queue.enqueue("b", 3)
                break
            except (aioredis.ConnectionError, ConnectionError):
                await asyncio.sleep(0.1)
        assert await queue.depth() == {3: 1}
        assert await queue.dequeue("c", LONG_LEASE, block_s=0) == "b"
    finally:
        await client.aclose()
