"""One project's requests are bounded per API process (service.api.admission): past its
share they wait their turn, past the waiting bound a 429 with Retry-After, while another
project is served as usual. On c069bd3 nothing bounded them: bench/tenancy.py measured
another project's p99 under such a flood at 10x its quiet value."""

from __future__ import annotations

import socket
import time

import httpx

from service.api.app import create_app
from tests.api.helpers import LiveServer, auth


def _stalled_upload(port: int, token: str) -> socket.socket:
    """A request that stays in progress: an upload whose body never finishes."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(
        f"POST /v1/datasets?name=slow.txt HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\nabc".encode()
    )
    return conn


def _answered(conn: socket.socket) -> bool:
    conn.setblocking(False)
    try:
        answered = bool(conn.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        answered = False
    conn.setblocking(True)
    if answered:
        conn.close()
    return answered


def _get(port: int, token: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(f"GET /v1/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    return conn


def _status(conn: socket.socket, timeout: float = 10) -> int:
    conn.settimeout(timeout)
    head = conn.recv(64).decode("latin-1")
    conn.close()
    return int(head.split()[1])


def test_a_projects_requests_past_its_share_wait_their_turn_and_others_pass_them(settings, make_token, redis_client):
    """Fair queuing: with one request of a project in progress at a time, its second waits
    (no answer, no 429) while another project's request is answered; the second runs as
    soon as the first ends. On the previous admission (a bound, no queue) the second ran
    at once beside the first."""
    settings.requests_in_progress_per_project, settings.max_requests_per_project = 1, 2
    flooding, other = make_token("flooding"), make_token("other")
    with LiveServer(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/v1/jobs", headers=auth(flooding)).status_code == 200  # its token is cached now
        stalled = _stalled_upload(server.port, flooding)
        waiting = []
        try:
            time.sleep(0.3)  # the upload is in progress (its answer would have come by now otherwise)
            assert not _answered(stalled)
            waiting = [_get(server.port, flooding) for _ in range(2)]
            assert http.get("/v1/jobs", headers=auth(other)).status_code == 200
            assert http.get("/healthz").status_code == 200
            assert not any(_answered(conn) for conn in waiting)  # still waiting behind the upload
            refused = http.get("/v1/jobs", headers=auth(flooding))  # a fourth: past the 2 that may wait
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", refused.text
            assert "UNROLL_MAX_REQUESTS_PER_PROJECT=2" in refused.json()["error"]["message"]
        finally:
            stalled.close()
        assert [_status(conn) for conn in waiting] == [200, 200]  # their turns came when it ended
        assert http.get("/v1/jobs", headers=auth(flooding)).status_code == 200
