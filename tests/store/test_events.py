"""Live job events over a real Redis pub/sub."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import redis.asyncio as aioredis

from service.store.events import EventType, encode, publish, subscribe
from service.store.keys import Keys

pytestmark = pytest.mark.redis


async def test_published_events_reach_a_subscriber_in_order(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    async with subscribe(redis_client, "job-1", prefix=redis_prefix) as events:
        await publish(redis_client, "job-1", {"type": "state", "state": "running", "attempt": 1}, prefix=redis_prefix)
        for step in range(1, 51):
            await publish(redis_client, "job-1", {"type": EventType.PROGRESS, "step": step}, prefix=redis_prefix)
        await publish(redis_client, "job-1", {"type": "state", "state": "succeeded"}, prefix=redis_prefix)

        received = [await asyncio.wait_for(events.get(), timeout=10) for _ in range(52)]

    assert [e["type"] for e in received] == ["state"] + ["progress"] * 50 + ["state"]
    assert [e["step"] for e in received[1:-1]] == list(range(1, 51))
    assert received[0]["state"] == "running" and received[-1]["state"] == "succeeded"
    assert all(e["job_id"] == "job-1" and isinstance(e["ts"], float) for e in received)


async def test_async_iteration(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    async with subscribe(redis_client, "j", prefix=redis_prefix) as events:
        for i in range(3):
            await publish(redis_client, "j", {"type": "log", "lines": [f"line {i}"]}, prefix=redis_prefix)
        seen = []
        async for event in events:
            seen.append(event["lines"][0])
            if len(seen) == 3:
                break
    assert seen == ["line 0", "line 1", "line 2"]


async def test_a_subscriber_sees_only_its_job_and_prefix(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    async with subscribe(redis_client, "mine", prefix=redis_prefix) as events:
        await publish(redis_client, "other", {"type": "state", "state": "running"}, prefix=redis_prefix)
        await publish(redis_client, "mine", {"type": "state", "state": "x"}, prefix=f"{redis_prefix}-elsewhere")
        await publish(redis_client, "mine", {"type": "state", "state": "running"}, prefix=redis_prefix)
        event = await asyncio.wait_for(events.get(), timeout=10)
        assert (event["job_id"], event["state"]) == ("mine", "running")
        assert await events.get(timeout=0.1) is None


async def test_publish_is_fire_and_forget(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    # Nobody listens: the event is gone, and a later subscriber does not get it.
    assert await publish(redis_client, "j", {"type": "state", "state": "queued"}, prefix=redis_prefix) == 0
    async with subscribe(redis_client, "j", prefix=redis_prefix) as events:
        assert await events.get(timeout=0.1) is None
        assert await publish(redis_client, "j", {"type": "state", "state": "running"}, prefix=redis_prefix) == 1
        assert (await asyncio.wait_for(events.get(), timeout=10))["state"] == "running"


async def test_closing_unsubscribes(redis_client: aioredis.Redis, make_redis, redis_prefix: str) -> None:
    channel = Keys(redis_prefix).job_events("j")
    observer = make_redis()
    async with subscribe(redis_client, "j", prefix=redis_prefix):
        assert dict(await observer.pubsub_numsub(channel))[channel.encode()] == 1

    async def unsubscribed() -> bool:
        return dict(await observer.pubsub_numsub(channel))[channel.encode()] == 0

    for _ in range(200):
        if await unsubscribed():
            break
        await asyncio.sleep(0.05)
    assert await unsubscribed()


async def test_decoded_client(make_redis, redis_prefix: str) -> None:
    client = make_redis(decode_responses=True)
    async with subscribe(client, "j", prefix=redis_prefix) as events:
        await publish(client, "j", {"type": "metrics", "step": 3, "values": {"train/loss": 1.5}}, prefix=redis_prefix)
        event = await asyncio.wait_for(events.get(), timeout=10)
    assert event["values"] == {"train/loss": 1.5}


def test_non_finite_values_become_null() -> None:
    text = encode("j", {"type": "metrics", "values": {"a": math.nan, "b": [math.inf, 1.0]}, "ts": 1.0})
    assert json.loads(text) == {"type": "metrics", "values": {"a": None, "b": [None, 1.0]}, "ts": 1.0, "job_id": "j"}


def test_an_event_needs_a_type() -> None:
    with pytest.raises(ValueError, match="type"):
        encode("j", {"state": "running"})
    assert json.loads(encode("j", {"type": EventType.STATE}))["type"] == "state"
