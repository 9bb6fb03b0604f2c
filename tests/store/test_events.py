"""A job's events in a real Redis Stream: appended in order with ids, trimmed and expired,
read back after an id; and the hub that follows many streams with one XREAD."""

from __future__ import annotations

import json
import math

import pytest
import redis
import redis.asyncio as aioredis

from service.store import event_hub, events
from service.store.event_hub import EventHub, Overflow
from service.store.events import EventType, encode
from service.store.keys import Keys

pytestmark = pytest.mark.redis


def state(name: str, attempt: int = 1) -> dict:
    return events.state_event(name, attempt, "test")


async def test_appended_events_come_back_in_order_with_their_ids(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    keys = Keys(redis_prefix)
    batch = [("j1", state("running"))] + [("j1", {"type": "progress", "step": s}) for s in range(1, 51)] + [("j1", state("succeeded"))]
    ids = await events.append(redis_client, keys, batch)
    assert len(ids) == 52 and [events.parse_id(i) for i in ids] == sorted(events.parse_id(i) for i in ids)

    read = await events.read_after(redis_client, keys.job_events("j1"), events.START, page=7)
    assert [i for i, _ in read] == ids
    assert [e["type"] for _, e in read] == ["state"] + ["progress"] * 50 + ["state"]
    assert all(e["job_id"] == "j1" and isinstance(e["ts"], float) for _, e in read)
    after = await events.read_after(redis_client, keys.job_events("j1"), ids[49])
    assert [e.get("step") for _, e in after] == [50, None]
    # another job's stream, another prefix's: not this one
    await events.append(redis_client, keys, [("j2", state("queued"))])
    await events.append(redis_client, Keys(f"{redis_prefix}-other"), [("j1", state("failed"))])
    assert len(await events.read_after(redis_client, keys.job_events("j1"), events.START)) == 52
    await redis_client.delete(Keys(f"{redis_prefix}-other").job_events("j1"))


async def test_a_stream_expires_soon_after_its_job_ends(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    keys = Keys(redis_prefix)
    key = keys.job_events("j")
    await events.append(redis_client, keys, [("j", state("running"))])
    assert events.ENDED_TTL_S < await redis_client.ttl(key) <= events.LIVE_TTL_S
    await events.append(redis_client, keys, [("j", state("failed"))])
    assert 0 < await redis_client.ttl(key) <= events.ENDED_TTL_S
    await events.append(redis_client, keys, [("j", state("queued", 1))])  # retried: live again
    assert await redis_client.ttl(key) > events.ENDED_TTL_S


async def test_a_stream_is_trimmed_and_knows_what_it_no_longer_holds(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    keys = Keys(redis_prefix)
    key = keys.job_events("j")
    assert (await events.position(redis_client, key)) == events.Position(events.START)
    assert (await events.position(redis_client, key)).holds_after(events.START)  # nothing was ever there
    first = await events.append(redis_client, keys, [("j", {"type": "progress", "step": 0})])
    ids = first + await events.append(redis_client, keys, [("j", {"type": "progress", "step": s}) for s in range(1, 3 * events.STREAM_LENGTH)])
    length = await redis_client.xlen(key)
    assert events.STREAM_LENGTH <= length < 2 * events.STREAM_LENGTH  # MAXLEN ~
    at = await events.position(redis_client, key)
    assert at.exists and at.last == ids[-1]
    assert at.holds_after(ids[-1]) and at.holds_after(ids[-10])
    assert not at.holds_after(ids[0])  # what followed was trimmed away
    assert not at.holds_after(events.START)
    assert not at.holds_after(f"{events.parse_id(ids[-1])[0] + 1}-0")  # an id from the future
    with pytest.raises(ValueError):
        events.parse_id("1-2-3")
    assert not events.is_id("abc") and not events.is_id(f"{2**64}-0") and events.is_id("0-0")


def test_non_finite_values_become_null() -> None:
    text = encode("j", {"type": "metrics", "values": {"a": math.nan, "b": [math.inf, 1.0]}, "ts": 1.0})
    assert json.loads(text) == {"type": "metrics", "values": {"a": None, "b": [None, 1.0]}, "ts": 1.0, "job_id": "j"}


def test_an_event_needs_a_type() -> None:
    with pytest.raises(ValueError, match="type"):
        encode("j", {"state": "running"})
    assert json.loads(encode("j", {"type": EventType.STATE}))["type"] == "state"
    assert events.ends_stream(state("cancelled")) and not events.ends_stream(state("queued"))


def test_a_sync_publisher_stays_quiet_after_a_failure(redis_url: str, redis_prefix: str) -> None:
    down = events.Publisher(redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2), redis_prefix)
    down([("j", state("running"))])  # logs, never raises
    assert down._quiet_until > 0
    client = redis.Redis.from_url(redis_url)
    try:
        events.Publisher(client, redis_prefix)([("j", state("running")), ("j", {"type": "progress", "step": 1})])
        entries = client.xrange(Keys(redis_prefix).job_events("j"))
        assert [json.loads(fields[b"event"])["type"] for _, fields in entries] == ["state", "progress"]
    finally:
        client.delete(Keys(redis_prefix).job_events("j"))
        client.close()


async def test_the_async_publisher_keeps_commit_order(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    publisher = events.AsyncPublisher(redis_client, redis_prefix)
    for step in range(20):
        publisher([("j", {"type": "progress", "step": step})])
    await publisher.flush()
    read = await events.read_after(redis_client, Keys(redis_prefix).job_events("j"), events.START)
    assert [e["step"] for _, e in read] == list(range(20))
    await publisher.aclose()


# --- the hub ------------------------------------------------------------------------------------


@pytest.fixture
async def hub(make_redis):
    hub = EventHub(make_redis(decode_responses=True), block_ms=200)
    yield hub
    await hub.aclose()


async def drain(follower, n: int) -> list[tuple[str, dict]]:
    got = []
    while len(got) < n:
        entry = await follower.get(10)
        assert entry is not None, got
        got.append(entry)
    return got


async def test_followers_get_the_backlog_then_live_events_each_once(hub, redis_client, redis_prefix: str) -> None:
    keys = Keys(redis_prefix)
    key = keys.job_events("j")
    early = await events.append(redis_client, keys, [("j", {"type": "progress", "step": s}) for s in range(3)])
    fresh = await hub.follow(key, early[-1])  # from now on
    replaying = await hub.follow(key, events.START)  # from the start
    middle = await hub.follow(key, early[0])
    assert [e["step"] for _, e in replaying.replayed()] == [0, 1, 2]
    assert hub.followers == 3
    late = await events.append(redis_client, keys, [("j", {"type": "progress", "step": s}) for s in range(3, 8)])
    assert [i for i, _ in await drain(fresh, 5)] == late
    assert [e["step"] for _, e in await drain(replaying, 5)] == [3, 4, 5, 6, 7]
    assert [e["step"] for _, e in await drain(middle, 7)] == [1, 2, 3, 4, 5, 6, 7]
    assert await fresh.get(0.3) is None  # nothing more, and nothing twice
    other = await hub.follow(keys.job_events("other"), events.START)
    await events.append(redis_client, keys, [("other", state("queued"))])
    assert (await other.get(10))[1]["job_id"] == "other"
    assert await fresh.get(0.3) is None
    for follower in (fresh, replaying, middle, other):
        hub.leave(follower)
        hub.leave(follower)  # idempotent
    assert hub.followers == 0


async def test_a_slow_follower_overflows_after_what_it_was_given(hub, redis_client, redis_prefix: str, monkeypatch) -> None:
    monkeypatch.setattr(event_hub, "FOLLOWER_BUFFER", 5)
    keys = Keys(redis_prefix)
    slow = await hub.follow(keys.job_events("j"), events.START)
    await events.append(redis_client, keys, [("j", {"type": "progress", "step": s}) for s in range(20)])
    got = []
    with pytest.raises(Overflow):
        while True:
            entry = await slow.get(10)
            assert entry is not None
            got.append(entry[1]["step"])
    assert got == list(range(len(got))) and 5 <= len(got) < 20  # what it got has no gap


async def test_a_lost_redis_fails_every_follower(private_redis) -> None:
    client = aioredis.Redis.from_url(private_redis.url, decode_responses=True, socket_timeout=2)
    hub = EventHub(client, block_ms=200)
    try:
        followers = [await hub.follow(f"k{i}", events.START) for i in range(3)]
        private_redis.kill()
        for follower in followers:
            with pytest.raises((aioredis.ConnectionError, OSError)):
                for _ in range(10):
                    await follower.get(2)
        assert hub.followers == 0
        private_redis.start()  # the hub serves new followers again
        again = await hub.follow("k0", events.START)
        await client.xadd("k0", {"event": json.dumps({"type": "progress", "step": 1})})
        assert (await again.get(10))[1]["step"] == 1
    finally:
        await hub.aclose()
        await client.aclose()
