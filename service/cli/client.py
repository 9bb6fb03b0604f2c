"""A small synchronous Python client of the HTTP API (SPEC §5), used by the CLI.

    from service.cli.client import Client
    with Client("http://127.0.0.1:8000", token) as api:
        job = api.submit({"data": {"kind": "recall"}})
        for event in api.events(job["id"]):
            print(event)

Every error answer is raised as ``ApiError(status, code, message, field)``; a server that
cannot be reached is ``ApiError(0, "unreachable", ...)``.

Where the URL and token come from (``Client.from_config``): explicit arguments, else the
environment (``UNROLL_URL``, ``UNROLL_TOKEN``), else the client config file that ``unroll
up`` writes (``write_client_config``): ``.unroll/client.json`` in the working directory, or
the path in ``UNROLL_CLIENT_CONFIG``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from service.cli.errors import ApiError  # noqa: F401  (the client's errors: `from service.cli.client import ApiError`)
from service.store.lifecycle import TERMINAL_STATE_NAMES
from trainer.config import ID_PATTERN

DEFAULT_URL = "http://127.0.0.1:8000"
CONFIG_ENV = "UNROLL_CLIENT_CONFIG"
DEFAULT_CONFIG_PATH = Path(".unroll") / "client.json"
# Where `load` and `unroll generate JOB ...` keep downloaded checkpoints: <job>/<step>.pt.
DEFAULT_MODELS_PATH = Path(".unroll") / "models"


# --- where the client's URL and token come from ---------------------------------------------


def client_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def write_client_config(url: str, token: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Remember where the API is and a token for it (readable by the owner only)."""
    target = Path(path) if path is not None else client_config_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": url, "token": token}, fh)
    os.replace(tmp, target)
    return target


def read_client_config(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    target = Path(path) if path is not None else client_config_path()
    try:
        data = json.loads(target.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k in ("url", "token") and isinstance(v, str)}


def resolve(url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """(url, token): arguments, then UNROLL_URL / UNROLL_TOKEN, then the config file."""
    stored = read_client_config()
    url = url or os.environ.get("UNROLL_URL") or stored.get("url") or DEFAULT_URL
    token = token or os.environ.get("UNROLL_TOKEN") or stored.get("token")
    return url, token


# --- the client -----------------------------------------------------------------------------


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise ApiError(response.status_code, error.get("code", "error"), error.get("message", ""), error.get("field"))
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "error", response.text[:500] or response.reason_phrase) from None


class Client:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @classmethod
    def from_config(cls, url: str | None = None, token: str | None = None, **kwargs: Any) -> Client:
        url, token = resolve(url, token)
        return cls(url, token, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None
        _raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- jobs ---------------------------------------------------------------------------------

    def submit(self, config: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json=config, headers=headers)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list(
        self,
        *,
        state: str | None = None,
        sweep_id: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        params = {"state": state, "sweep_id": sweep_id, "tag": tag, "limit": limit, "cursor": cursor}
        return self._json("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/retry")

    def delete(self, job_id: str) -> None:
        """Delete a finished job and all it produced (409 while it is queued or running)."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def metrics(
        self,
        job_id: str,
        names: list[str] | None = None,
        *,
        since_step: int | None = None,
        max_points: int | None = None,
    ) -> dict[str, list[tuple[int, float | None]]]:
        params: dict[str, Any] = {"since_step": since_step, "max_points": max_points}
        params = {k: v for k, v in params.items() if v is not None}
        if names:
            params["names"] = list(names)
        series = self._json("GET", f"/v1/jobs/{job_id}/metrics", params=params)["series"]
        return {name: [(int(s), v) for s, v in points] for name, points in series.items()}

    def logs(self, job_id: str, *, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/logs", params={"after": after, "limit": limit})

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/checkpoints")["checkpoints"]

    def download_checkpoint(self, job_id: str, step: int, out: BinaryIO) -> int:
        """Stream one checkpoint into `out`; returns the bytes written."""
        return self._download(f"/v1/jobs/{job_id}/checkpoints/{step}", out)

    def download_model(self, job_id: str, out: BinaryIO) -> int:
        """Stream a completed job's model artifact into `out`; returns the bytes written."""
        return self._download(f"/v1/jobs/{job_id}/model", out)

    def _download(self, path: str, out: BinaryIO) -> int:
        written = 0
        try:
            with self._http.stream("GET", path) as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None
        return written

    def fetch_model(self, job_id: str, folder: str | os.PathLike[str] | None = None) -> Path:
        """The job's model as a local file, downloaded once into folder/<job>/ (default
        .unroll/models) and checked against its sha256: the model artifact of a completed
        job (`train.model`: last or best), else its latest checkpoint."""
        if not re.fullmatch(ID_PATTERN, job_id):
            raise ApiError(404, "not_found", f"job {job_id!r} not found")
        base = Path(folder if folder is not None else DEFAULT_MODELS_PATH) / job_id
        model = (self.get(job_id).get("summary") or {}).get("model")
        if model is not None:
            return _fetch_once(base / f"model-{model['sha256'][:16]}.pt", model["sha256"], lambda out: self.download_model(job_id, out), f"the model of job {job_id!r}")
        checkpoints = self.checkpoints(job_id)
        if not checkpoints:
            raise ApiError(409, "no_checkpoint", f"job {job_id!r} has no checkpoint yet")
        latest = max(checkpoints, key=lambda c: c["step"])
        return _fetch_once(
            base / f"{latest['step']}.pt", latest["sha256"], lambda out: self.download_checkpoint(job_id, latest["step"], out),
            f"the checkpoint of job {job_id!r} step {latest['step']}",
        )

    def load(self, job_id: str, *, device: str = "cpu", folder: str | os.PathLike[str] | None = None) -> Any:
        """The job's model (its latest checkpoint), as `trainer.load` returns it: a
        trainer.inference.Model with generate, stream, predict, evaluate and step."""
        from trainer.inference import load

        return load(self.fetch_model(job_id, folder), device)

    def events(self, job_id: str, *, timeout: float | None = None, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
        """The job's Server-Sent Events as dicts (each has `type`, and `event_id`, its SSE id):
        first its current state (or, with `last_event_id`, what followed that event), then
        live events; ends when the job finishes or the server ends the stream (`end`)."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with self._http.stream(
                "GET", f"/v1/jobs/{job_id}/events", headers=headers,
                timeout=httpx.Timeout(self._http.timeout.connect, read=timeout),
            ) as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                yield from parse_sse(response.iter_lines())
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"event stream from {self.url} broke: {exc}") from None

    def follow(self, job_id: str, *, read_timeout: float = 60.0, retries: int = 3) -> Iterator[dict[str, Any]]:
        """The job's events until its final `state` event, across as many streams as that
        takes: after an `end`, an `error` or a dropped connection it reconnects with the last
        event id, so nothing is missed or repeated. Raises ApiError once `retries`
        reconnections in a row have failed (the caller may poll instead)."""
        last_id: str | None = None
        failures = 0
        while True:
            try:
                for event in self.events(job_id, timeout=read_timeout, last_event_id=last_id):
                    failures = 0
                    last_id = event.get("event_id") or last_id
                    if event.get("type") in ("end", "error"):
                        break
                    yield event
                    if event.get("type") == "state" and event.get("state") in TERMINAL_STATE_NAMES:
                        return
            except ApiError as exc:
                if exc.status not in (0, 502, 503, 504) or failures >= retries:
                    raise
                failures += 1
                time.sleep(min(10.0, 0.5 * 2**failures))

    def compare(
        self, job_ids: list[str], *, metrics: list[str] | None = None, max_points: int | None = None
    ) -> dict[str, Any]:
        """GET /v1/compare: the jobs' config differences and their series aligned by step."""
        params: dict[str, Any] = {"jobs": ",".join(job_ids)}
        if metrics:
            params["metrics"] = ",".join(metrics)
        if max_points is not None:
            params["max_points"] = max_points
        return self._json("GET", "/v1/compare", params=params)

    # --- sweeps -------------------------------------------------------------------------------

    def create_sweep(
        self,
        base: dict[str, Any],
        grid: dict[str, list[Any]],
        *,
        seeds: int = 1,
        max_parallel: int | None = None,
        name: str | None = None,
        early_stop: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {
            "base": base, "grid": grid, "seeds": seeds, "max_parallel": max_parallel, "name": name,
            "early_stop": early_stop,
        }
        return self._json("POST", "/v1/sweeps", json={k: v for k, v in body.items() if v is not None})

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/sweeps/{sweep_id}")

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/sweeps/{sweep_id}/cancel")

    # --- datasets -----------------------------------------------------------------------------

    def upload_dataset(self, path: str | os.PathLike[str], name: str | None = None) -> dict[str, Any]:
        """Stream a local file to the service; returns {id, name, sha256, bytes, ...}."""
        path = Path(path)
        with path.open("rb") as fh:
            return self._json(
                "POST",
                "/v1/datasets",
                params={"name": name or path.name},
                content=_chunks(fh),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)},
            )

    def datasets(self, *, limit: int = 100) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/datasets", params={"limit": limit})["datasets"]

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset (409 while a queued or running job uses it)."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # --- admin --------------------------------------------------------------------------------

    def create_token(self, project: str, name: str | None = None) -> dict[str, Any]:
        """With the admin token: a new token of `project` (created if needed)."""
        return self._json("POST", f"/v1/admin/projects/{project}/tokens", json={"name": name} if name else None)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in _chunks(fh):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(fh: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := fh.read(size):
        yield chunk


def _fetch_once(target: Path, sha256: str, download: Callable[[BinaryIO], int], what: str) -> Path:
    """`target`, downloaded unless a file with that sha256 is there already; a download
    that arrives with another sha256 is discarded."""
    if target.is_file() and _sha256(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            download(out)
        if _sha256(tmp) != sha256:
            raise ApiError(0, "corrupt", f"{what} arrived damaged (sha256 differs)")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events to dicts: the JSON `data` of each event, with `type` defaulting
    to the event name. Comments (keep-alives) are skipped."""
    event, data, event_id = "message", [], None
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = {"data": text}
                if isinstance(payload, dict):
                    payload.setdefault("type", event)
                    if event_id is not None:
                        payload["event_id"] = event_id
                    yield payload
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value  # the SSE rule: it lasts until the next `id:`
