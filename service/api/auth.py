"""Who is calling: bearer tokens of a project, and the admin token.

A project token is a long random secret stored as its sha256 (service.store.db.repo.hash_token),
so a lookup is an equality match on the hash: no secret is ever compared in Python. The
admin token (``UNROLL_ADMIN_TOKEN``) lives only in the settings and is compared in constant
time. Verified tokens are cached by hash for ``UNROLL_TOKEN_CACHE_SECONDS`` (a submission
would otherwise spend a database round trip on every request); a revocation is announced
to every API process, which forgets the token at once (service.store.revocations).
``repo.authenticate`` throttles ``last_used_at`` writes, and the cache makes them rarer
still (one per cache period and token).
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.api.errors import Unauthorized
from service.store.db import repo
from service.store.quotas import NO_QUOTA, Quota


@dataclass(frozen=True)
class Principal:
    """A caller acting for one project, with the project's quota (cached with the token:
    a quota change is announced like a revocation, and every API process forgets the
    project's cached tokens)."""

    project_id: str
    token_id: str
    quota: Quota = NO_QUOTA


class TokenCache:
    """A small LRU of verified tokens: sha256 -> (principal, monotonic deadline)."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def get(self, token_hash: str) -> Principal | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        principal, deadline = entry
        if time.monotonic() >= deadline:
            del self._entries[token_hash]
            return None
        self._entries.move_to_end(token_hash)
        return principal

    def put(self, token_hash: str, principal: Principal, expires_at: datetime | None) -> None:
        if self.ttl_s <= 0:
            return
        ttl = self.ttl_s
        if expires_at is not None:  # never trust a token past its own expiry
            ttl = min(ttl, expires_at.timestamp() - time.time())
        if ttl <= 0:
            return
        self._entries[token_hash] = (principal, time.monotonic() + ttl)
        self._entries.move_to_end(token_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, token_hash: str) -> None:
        """A revoked token (service.store.revocations): the next request asks the database."""
        self._entries.pop(token_hash, None)

    def forget_project(self, project_id: str) -> None:
        """The project's quota changed: its tokens are looked up again."""
        for token_hash in [h for h, (p, _) in self._entries.items() if p.project_id == project_id]:
            del self._entries[token_hash]

    def clear(self) -> None:
        self._entries.clear()


def is_admin(token: str, admin_token: str | None) -> bool:
    if not admin_token:
        return False
    return hmac.compare_digest(token.encode(), admin_token.encode())


async def authenticate(
    token: str | None,
    sessions: async_sessionmaker[AsyncSession],
    cache: TokenCache,
    admin_token: str | None,
) -> Principal:
    """The project a bearer token acts for; Unauthorized (401) otherwise."""
    if not token:
        raise Unauthorized()
    token_hash = repo.hash_token(token)
    principal = cache.get(token_hash)
    if principal is not None:
        return principal
    async with sessions() as session, session.begin():
        row = await session.run_sync(repo.authenticate, token)
        if row is not None:
            project = await session.run_sync(repo.get_project, row.project_id)
            principal = Principal(project_id=row.project_id, token_id=row.id, quota=repo.quota_of(project))
            expires_at = row.expires_at
    if principal is None:
        if is_admin(token, admin_token):
            raise Unauthorized("the admin token only works on /v1/admin routes; use a project token")
        raise Unauthorized("invalid, revoked or expired token")
    cache.put(token_hash, principal, expires_at)
    return principal


def require_admin(token: str | None, admin_token: str | None) -> None:
    if not admin_token:
        raise Unauthorized("no admin token is configured (UNROLL_ADMIN_TOKEN)")
    if not token or not is_admin(token, admin_token):
        raise Unauthorized("admin token required")
