"""A property-based fuzz run against our own OpenAPI (schemathesis): every documented
operation gets generated requests, valid and invalid, with a real token, over real HTTP;
none may answer 5xx. Bounded in examples per operation and in time."""

from __future__ import annotations

import asyncio
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings as hypothesis_settings  # noqa: E402

from tests.api.helpers import JOB, auth  # noqa: E402

pytestmark = [pytest.mark.redis, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 25
BUDGET_S = 50


def fuzz(url: str, token: str) -> list[str]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    seen: list[int] = []
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 17
    for operation in operations:
        if time.monotonic() - started > BUDGET_S:
            break

        @hypothesis_settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case) -> None:
            case.headers = {**(case.headers or {}), **auth(token)}
            try:
                response = case.call(base_url=url, timeout=10)
            except Exception as exc:
                failures.append(f"{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}; headers={case.headers!r} body={str(case.body)[:300]!r}")
                return
            seen.append(response.status_code)
            # /readyz answers 503 by design while no dispatcher runs
            if response.status_code >= 500 and case.path != "/readyz":
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")

        run()
    print("fuzz statuses:", sorted(__import__("collections").Counter(seen).items()))
    return failures


async def test_fuzz_finds_no_5xx(live_server, make_token):
    token = make_token()
    import httpx

    async with httpx.AsyncClient(base_url=live_server.url, headers=auth(token)) as http:
        assert (await http.post("/v1/jobs", json=JOB)).status_code == 201  # something to find
    started = time.monotonic()
    failures = await asyncio.to_thread(fuzz, live_server.url, token)
    assert not failures, "\n".join(failures[:20])
    assert time.monotonic() - started < BUDGET_S + 15
