"""`unroll submit --wait` follows the job's event stream, and polls when it cannot."""

from __future__ import annotations

import pytest

from service.cli.client import ApiError, Client, parse_sse
from service.cli.follow import follow_job


class FakeApi:
    def __init__(self, events=None, broken: ApiError | None = None, states=("running", "succeeded")):
        self.events, self.broken = events or [], broken
        self.polled = list(states)
        self.gets = 0

    def follow(self, job_id):
        if self.broken is not None:
            raise self.broken
        yield from self.events

    def get(self, job_id):
        self.gets += 1
        state = self.polled.pop(0) if len(self.polled) > 1 else self.polled[0]
        return {"id": job_id, "state": state, "step": 5, "max_steps": 10, "metrics": {}}


JOB = {"id": "job_1", "state": "queued", "step": 0, "max_steps": 10}


def test_it_follows_the_stream_then_reads_the_job_once():
    api = FakeApi(events=[
        {"type": "state", "snapshot": True, "state": "queued", "step": 0, "max_steps": 10, "pending_reason": "waiting for 1 CPU"},
        {"type": "state", "state": "running", "attempt": 1},
        {"type": "progress", "step": 5, "max_steps": 10, "loss": 1.5},
        {"type": "metrics", "values": {"train/loss": 1.25}},
        {"type": "state", "state": "succeeded", "attempt": 1},
    ], states=("succeeded",))
    assert follow_job(api, JOB, interval=0)["state"] == "succeeded"
    assert api.gets == 1


def test_it_polls_when_the_stream_cannot_be_had(capsys):
    api = FakeApi(broken=ApiError(503, "unavailable", "Redis is unavailable"))
    assert follow_job(api, JOB, interval=0)["state"] == "succeeded"
    assert api.gets == 2 and "polling instead" in capsys.readouterr().err
    with pytest.raises(ApiError):  # not for a job it may not see
        follow_job(FakeApi(broken=ApiError(404, "not_found", "no such job")), JOB, interval=0)


def test_the_client_reconnects_after_an_end_with_the_last_event_id(monkeypatch):
    asked: list[str | None] = []
    streams = [
        [{"type": "state", "snapshot": True, "state": "queued", "event_id": "0-0"}, {"type": "end", "reason": "max_duration", "event_id": "0-0"}],
        [{"type": "state", "state": "running", "attempt": 1, "event_id": "5-0"}],  # a connection that broke
        [{"type": "state", "state": "succeeded", "attempt": 1, "event_id": "9-0"}, {"type": "progress", "event_id": "10-0"}],
    ]

    def events(self, job_id, *, timeout=None, last_event_id=None):
        asked.append(last_event_id)
        yield from streams[len(asked) - 1]

    monkeypatch.setattr(Client, "events", events)
    with Client("http://unroll.invalid", "token") as api:
        seen = [(e["type"], e.get("state")) for e in api.follow("job_1")]
    assert seen == [("state", "queued"), ("state", "running"), ("state", "succeeded")]  # not the end, nor after the final state
    assert asked == [None, "0-0", "5-0"]


def test_sse_ids_reach_the_events():
    lines = ["retry: 1000", "", "id: 1-0", "event: state", 'data: {"state": "queued"}', "", ": keep-alive", "", 'data: {"x": 1}', ""]
    assert list(parse_sse(iter(lines))) == [
        {"state": "queued", "type": "state", "event_id": "1-0"},
        {"x": 1, "type": "message", "event_id": "1-0"},  # an id lasts until the next one (SSE)
    ]
