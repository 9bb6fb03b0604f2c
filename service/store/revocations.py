"""Revoked tokens, told to every API process at once.

An API process trusts a verified token for ``UNROLL_TOKEN_CACHE_SECONDS`` without asking
the database (service.api.auth). A revocation (``unroll token revoke``, or the admin
route) publishes the token's hash on one Redis channel; every API process listens and
forgets it, so the token is refused on its next request on every replica. A listener that
lost Redis cannot know what it missed: when it subscribes again it forgets every token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis
import redis.asyncio as aioredis

from service.store.keys import Keys

log = logging.getLogger("unroll.api")

RETRY_S = 1.0


async def announce(client: aioredis.Redis, keys: Keys, token_hash: str) -> None:
    await client.publish(keys.token_revocations, token_hash)


def announce_sync(redis_url: str, keys: Keys, token_hash: str) -> bool:  # or PROJECT + id
    """announce, for the command line; False when Redis does not answer."""
    try:
        with redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) as client:
            client.publish(keys.token_revocations, token_hash)
        return True
    except (redis.RedisError, OSError):
        return False


# An announcement is a token's hash, or this prefix and a project id: the project's quota
# changed, and the tokens cached with the old one are forgotten.
PROJECT = "project:"


async def announce_project(client: aioredis.Redis, keys: Keys, project_id: str) -> None:
    await client.publish(keys.token_revocations, PROJECT + project_id)


def announce_project_sync(redis_url: str, keys: Keys, project_id: str) -> bool:
    return announce_sync(redis_url, keys, PROJECT + project_id)


async def listen(
    client: aioredis.Redis,
    keys: Keys,
    forget: Callable[[str], None],
    forget_all: Callable[[], None],
    forget_project: Callable[[str], None],
) -> None:
    """Forget each token announced as revoked (each project's tokens, when its quota
    changed), until cancelled; after every (re)subscription, forget them all
    (announcements may have been missed meanwhile)."""
    while True:
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(keys.token_revocations)
            forget_all()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if asyncio.current_task().cancelling():  # redis-py 8 may swallow the cancel of a read
                    raise asyncio.CancelledError
                if message is not None and message["type"] == "message":
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    if text.startswith(PROJECT):
                        forget_project(text[len(PROJECT):])
                    else:
                        forget(text)
        except asyncio.CancelledError:
            raise
        except (aioredis.RedisError, OSError) as exc:
            log.warning("token revocations: lost Redis (%s); cached tokens are forgotten when it is back", exc)
            await asyncio.sleep(RETRY_S)
        finally:
            try:
                await pubsub.aclose()
            except (aioredis.RedisError, OSError):
                pass
