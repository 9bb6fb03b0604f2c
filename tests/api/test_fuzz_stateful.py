"""A stateful property-based run (schemathesis) over a job's lifecycle: sequences of submit,
get, cancel, retry, delete and reads of what a job produced, each step fed the job id
that an earlier step's response named, with a real token, over real HTTP. None may answer
5xx. tests/api/test_fuzz.py fuzzes each operation alone; this one reaches the states only a
sequence reaches (a retried job, a deleted one, a job retried after it was deleted).

The links between the operations (OpenAPI links: which response feeds which request) are
declared here, on a copy of our OpenAPI, so the served document stays free of test wiring.
The run is bounded in time: batches of scenarios until the budget is spent.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
import httpx
import hypothesis

from tests.api.helpers import JOB, auth

pytestmark = [pytest.mark.redis, pytest.mark.slow]

BUDGET_S = 10  # per database; the run stops starting batches past it
SCENARIOS_PER_BATCH = 10
STEPS_PER_SCENARIO = 10

SUBMIT = ("post", "/v1/jobs")
GET = ("get", "/v1/jobs/{job_id}")
CANCEL = ("post", "/v1/jobs/{job_id}/cancel")
RETRY = ("post", "/v1/jobs/{job_id}/retry")
DELETE = ("delete", "/v1/jobs/{job_id}")
# Reads of a job's outputs. Not its event stream: on a job that never runs (no worker here)
# a stream stays open until UNROLL_STREAM_MAX_SECONDS, which a fuzz step cannot wait for.
READS = [("get", "/v1/jobs/{job_id}/metrics"), ("get", "/v1/jobs/{job_id}/logs"), ("get", "/v1/jobs/{job_id}/checkpoints")]
ACTIONS = [GET, CANCEL, RETRY, DELETE, *READS]

# (operation, status) -> where the job id is in its response. Every such response links to
# every action on that job.
PRODUCERS = {
    (SUBMIT, "201"): "$response.body#/id",
    (SUBMIT, "200"): "$response.body#/id",  # a repeat of an Idempotency-Key
    (GET, "200"): "$response.body#/id",
    (CANCEL, "202"): "$response.body#/id",
    (RETRY, "200"): "$response.body#/id",
    (DELETE, "204"): "$request.path.job_id",  # then every action meets a deleted job
}


def with_links(spec: dict) -> dict:
    """Our OpenAPI reduced to the jobs' operations above, with links between them."""
    spec = copy.deepcopy(spec)
    wanted = {SUBMIT, *ACTIONS}
    spec["paths"] = {
        path: kept
        for path, operations in spec["paths"].items()
        if (kept := {method: op for method, op in operations.items() if (method, path) in wanted})
    }
    operation_id = {(method, path): op["operationId"] for path, ops in spec["paths"].items() for method, op in ops.items()}
    for ((method, path), status), job_id in PRODUCERS.items():
        response = spec["paths"][path][method]["responses"][status]
        response["links"] = {
            f"{target_method.upper()} {target_path}": {
                "operationId": operation_id[(target_method, target_path)],
                "parameters": {"path.job_id": job_id},
            }
            for target_method, target_path in ACTIONS
        }
    return spec


def run_workflow(url: str, token: str, spec: dict) -> tuple[list[str], Counter]:
    schema = schemathesis.openapi.from_dict(with_links(spec))
    failures: list[str] = []
    statuses: Counter = Counter()

    base = schema.as_state_machine()
    # Chains start from a submission. A root that draws a random job id only
    # repeats test_fuzz.py's 404s, and would take half of the budget from the sequences.
    random_id_roots = {name for name in base.root_rules if "job_id" in name}

    class Workflow(base):  # type: ignore[misc, valid-type]
        root_rules = base.root_rules - random_id_roots

        def setup(self) -> None:
            self.trail: list[str] = []

        def before_call(self, case) -> None:
            case.headers = {**(case.headers or {}), **auth(token)}
            # Most generated configs are refused (422), which ends a chain at its start:
            # every other submission sends a valid job instead, so chains get long.
            if (case.method, case.path) == ("POST", SUBMIT[1]) and len(self.trail) % 2 == 0:
                case.body = copy.deepcopy(JOB)

        def get_call_kwargs(self, case) -> dict:
            return {"base_url": url, "timeout": 10}

        def call(self, case, **kwargs):
            try:
                return super().call(case, **kwargs)
            except Exception as exc:  # a dropped connection or a timeout is a finding too
                failures.append(self._report(case, f"{type(exc).__name__}: {exc}"))
                raise

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            # Only the server's errors count here; the single-operation run checks the rest.
            code = response.status_code
            statuses[(case.method, case.path, code)] += 1
            self.trail.append(f"{case.method} {case.formatted_path} -> {code}")
            if code >= 500:
                failures.append(self._report(case, response.text[:300]))

        def _report(self, case, what: str) -> str:
            body = f" body={str(case.body)[:200]!r}" if isinstance(case.body, (dict, list, str)) else ""
            steps = "\n    ".join(self.trail[-STEPS_PER_SCENARIO:])
            return f"{case.method} {case.formatted_path}{body}: {what}\n  after:\n    {steps}"

    for name in random_id_roots:
        setattr(Workflow, name, None)  # hypothesis finds no rule under this name any more
    assert Workflow.root_rules, "no operation left to start a chain"

    settings = hypothesis.settings(
        max_examples=SCENARIOS_PER_BATCH,
        stateful_step_count=STEPS_PER_SCENARIO,
        deadline=None,
        database=None,
        phases=[hypothesis.Phase.generate],  # no shrinking: the trail says what led there
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    started = time.monotonic()
    while time.monotonic() - started < BUDGET_S and not failures:
        try:
            Workflow.run(settings=settings)
        except Exception as exc:
            if failures:  # a failed call, already reported
                break
            if not answered_differently(exc):
                raise
    return failures, statuses


def answered_differently(exc: BaseException) -> bool:
    """Hypothesis ended the batch because a scenario it replayed drew differently: the API
    is a live system and answered a repeated request otherwise (a job id already deleted,
    an Idempotency-Key seen before). Not a finding; schemathesis' own runner moves on too."""
    if isinstance(exc, hypothesis.errors.Flaky):
        return True
    if not isinstance(exc, AssertionError) or exc.__traceback__ is None:
        return False
    # Some replays end in an assertion of hypothesis' data tree instead of Flaky.
    innermost = exc.__traceback__
    while innermost.tb_next is not None:
        innermost = innermost.tb_next
    return innermost.tb_frame.f_globals.get("__name__", "").startswith("hypothesis.internal.conjecture")


async def test_job_lifecycle_sequences_find_no_5xx(live_server, make_token):
    token = make_token()
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        spec = (await http.get("/openapi.json")).json()
    started = time.monotonic()
    failures, statuses = await asyncio.to_thread(run_workflow, live_server.url, token, spec)
    print("stateful statuses:", sorted(statuses.items()))
    assert not failures, "\n".join(failures[:10])
    # The links carried real ids along: each step of the lifecycle succeeded somewhere.
    for method, path, code in [("POST", SUBMIT[1], 201), ("GET", GET[1], 200), ("POST", CANCEL[1], 202),
                               ("POST", RETRY[1], 200), ("DELETE", DELETE[1], 204), ("POST", RETRY[1], 404)]:
        assert statuses[(method, path, code)] > 0, f"no {method} {path} answered {code}: {sorted(statuses.items())}"
    assert time.monotonic() - started < BUDGET_S + 20
