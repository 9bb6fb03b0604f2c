"""The `unroll` command: one entry point, one sub-command per role or action (SPEC §6).

Each sub-command's module is imported only when it runs, so `unroll train` needs no
service dependencies at start-up and `unroll --help` stays fast.

    train                      trainer.cli (local, no services)
    db upgrade                 migrations
    api                        the HTTP API (uvicorn)
    token, project             tokens and quotas, straight in the database (service.cli.admin)
    submit / status / logs / cancel / retry
                               the HTTP client (service.cli.client), reading the URL and token
                               from --url/--token, UNROLL_URL/UNROLL_TOKEN, or the file
                               `unroll up` writes
    worker                     the dispatcher (workers.dispatcher)
    sweep, up                  service.cli.sweep, service.cli.up
    compare                    service.cli.compare
    delete, dataset            service.cli.data
    node list / drain          the cluster's Ray nodes (service.cli.node)
"""

from __future__ import annotations

import argparse
import sys
import time

from service.cli import admin, compare, data, node, sweep, up
from service.cli.common import (
    TERMINAL,
    UsageError,
    add_client_args,
    fail,
    open_client,
    read_config,
    table,
)
from service.cli.errors import ApiError
from trainer import use_cli


def _db(subparsers) -> None:
    p = subparsers.add_parser("db", help="database maintenance")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations (to head by default)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)


def _db_upgrade(args: argparse.Namespace) -> int:
    from service.store.db.migrate import upgrade

    upgrade(revision=args.revision)
    print(f"database upgraded to {args.revision}")
    return 0


# --- api and tokens (server side) -------------------------------------------------------------


def _api(subparsers) -> None:
    p = subparsers.add_parser("api", help="run the HTTP API (settings from UNROLL_* / .env)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument(
        "--log-level", default=None, choices=["debug", "info", "warning", "error", "critical"],
        help="of the server and the `unroll` loggers (default: UNROLL_LOG_LEVEL, else info)",
    )
    p.set_defaults(func=_run_api)


def _run_api(args: argparse.Namespace) -> int:
    import importlib.util
    import os

    import uvicorn

    from service.api.app import create_app
    from service.store.settings import get_settings

    fast = {}
    if importlib.util.find_spec("uvloop"):
        fast["loop"] = "uvloop"
    if importlib.util.find_spec("httptools"):
        fast["http"] = "httptools"
    if args.log_level is not None:
        # Through the environment, so uvicorn's worker processes read it as a setting too.
        os.environ["UNROLL_LOG_LEVEL"] = args.log_level
        get_settings.cache_clear()
    uvicorn.run(
        # By import path (uvicorn's worker processes import it themselves), derived from
        # the imported function so the import graph sees this dependency.
        f"{create_app.__module__}:{create_app.__name__}",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=get_settings().log_level,
        access_log=False,
        **fast,
    )
    return 0


# --- client commands --------------------------------------------------------------------------


def _client_commands(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit a job config (YAML or JSON)")
    p.add_argument("config")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    p.add_argument("--idempotency-key", default=None)
    add_client_args(p)
    p.set_defaults(func=_submit)

    p = subparsers.add_parser("status", help="one job in detail, or the list of jobs")
    p.add_argument("id", nargs="?")
    p.add_argument("--state", default=None)
    p.add_argument("--limit", type=int, default=20)
    add_client_args(p)
    p.set_defaults(func=_status)

    p = subparsers.add_parser("logs", help="a job's log lines")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    add_client_args(p)
    p.set_defaults(func=_logs)

    p = subparsers.add_parser("cancel", help="cancel a job")
    p.add_argument("id")
    add_client_args(p)
    p.set_defaults(func=_cancel)

    p = subparsers.add_parser(
        "retry", help="requeue a failed or cancelled job: it resumes from its last checkpoint, same id",
        description="Without --new: POST /v1/jobs/ID/retry (SPEC §5), the same job queued again with a fresh "
        "budget of attempts, resuming from its last checkpoint. With --new: a new job of the project with the "
        f"same config, tagged {RETRY_TAG}ID, from step 0 (for a job in any state, a succeeded one too).",
    )
    p.add_argument("id")
    p.add_argument("--new", action="store_true", help=f"submit its config again as a new job (tagged {RETRY_TAG}ID)")
    add_client_args(p)
    p.set_defaults(func=_retry)


def _submit(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    try:
        with open_client(args) as api:
            job = api.submit(config, idempotency_key=args.idempotency_key)
            print(job["id"])
            if not args.wait:
                return 0
            job = _follow(api, job)
    except KeyboardInterrupt:
        print("\nstopped following; the job goes on", file=sys.stderr)
        return 130
    summary = job.get("summary") or {}
    line = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    print(f"{job['id']} {job['state']}" + (f": {line}" if line else "") + (f" error: {job['error']}" if job.get("error") else ""))
    return 0 if job["state"] == "succeeded" else 1


def _follow(api, job: dict, interval: float = 1.0) -> dict:
    """A progress bar until the job ends, from its event stream (polling if the stream
    cannot be had): service.cli.follow."""
    from service.cli.follow import follow_job

    return follow_job(api, job, interval)


def _when(stamp: str | None) -> str:
    return stamp.replace("T", " ")[:19] if stamp else "-"


def _status(args: argparse.Namespace) -> int:
    with open_client(args) as api:
        if args.id:
            job = api.get(args.id)
            _print_job(job)
            return 0
        page = api.list(state=args.state, limit=args.limit)
    rows = [
        [j["id"], j["state"], f"{100 * j['progress']:.0f}%", str(j["step"]), str(j["attempt"]), _when(j["created_at"]), j["name"] or ""]
        for j in page["jobs"]
    ]
    header = ["ID", "STATE", "PROGRESS", "STEP", "ATTEMPT", "CREATED", "NAME"]
    waiting = [(j.get("pending_reason") or "") if j["state"] == "queued" else "" for j in page["jobs"]]
    if any(waiting):  # why a queued job is not placed yet (quota, resources, a sweep's max_parallel)
        rows = [[*row, reason] for row, reason in zip(rows, waiting)]
        header.append("WAITING")
    print(table(rows, header) if rows else "no jobs")
    return 0


def _print_job(job: dict) -> None:
    fields = [
        ("id", job["id"]),
        ("name", job["name"] or "-"),
        ("state", job["state"] + (" (cancel requested)" if job["cancel_requested"] and job["state"] == "running" else "")),
        ("progress", f"{100 * job['progress']:.1f}% (step {job['step']}/{job['max_steps'] or '?'})"),
        ("attempt", f"{job['attempt']} of {job['max_attempts']}"),
        ("worker", job["worker"] or "-"),
        ("created", _when(job["created_at"])),
        ("started", _when(job["started_at"])),
        ("finished", _when(job["finished_at"])),
    ]
    if job.get("pending_reason"):
        fields.append(("waiting", job["pending_reason"]))
    if job.get("error"):
        fields.append(("error", job["error"]))
    for name, point in sorted((job.get("metrics") or {}).items()):
        value = point["value"]
        fields.append((name, f"{value:.6g} @ step {point['step']}" if value is not None else f"non-finite @ step {point['step']}"))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")


def _logs(args: argparse.Namespace) -> int:
    try:
        with open_client(args) as api:
            after = _print_logs(api, args.id, 0)
            if args.follow:
                after = _follow_logs(api, args.id, after)
                _print_logs(api, args.id, after)  # lines written just before the job ended
    except KeyboardInterrupt:
        return 130
    return 0


_LOG_PAGE = 1000


def _print_logs(api, job_id: str, after: int) -> int:
    """Print the job's lines after line id `after`; returns the id of the last one."""
    while True:
        page = api.logs(job_id, after=after, limit=_LOG_PAGE)
        for line in page["lines"]:
            print(line["line"], flush=True)
        after = page["next_after"]
        if len(page["lines"]) < _LOG_PAGE:
            return after


def _follow_logs(api, job_id: str, after: int) -> int:
    """Print new lines until the job ends. The job's event stream (reconnecting with
    Last-Event-ID, Client.follow) says when: each `log` or `state` event makes it read the
    lines after the last one printed, so a line is printed once and none is skipped, however
    events and reads interleave. Polls once a second when the stream cannot be had."""
    try:
        for event in api.follow(job_id):
            if event.get("type") in ("log", "state"):
                after = _print_logs(api, job_id, after)
        return after
    except ApiError as exc:
        if exc.status in (401, 403, 404):
            raise
        print(f"live events unavailable ({exc.message}); polling instead", file=sys.stderr)
    while api.get(job_id)["state"] not in TERMINAL:
        after = _print_logs(api, job_id, after)
        time.sleep(1.0)
    return after


def _cancel(args: argparse.Namespace) -> int:
    with open_client(args) as api:
        job = api.cancel(args.id)
    note = " (cancel requested; it stops within about a second)" if job["state"] == "running" else ""
    print(f"{job['id']} {job['state']}{note}")
    return 0


# A new job made by `unroll retry --new` carries this tag with its origin's id.
RETRY_TAG = "retry-of:"


def _retry(args: argparse.Namespace) -> int:
    try:
        with open_client(args) as api:
            if not args.new:
                job = api.retry(args.id)
                print(f"{job['id']} {job['state']}: it resumes from its last checkpoint")
                return 0
            config = _retry_config(api.get(args.id), args.id)
            job = api.submit(config)
    except ApiError as exc:
        if exc.status == 409 and not args.new:
            print(f"hint: `unroll retry {args.id} --new` runs its config again as a new job", file=sys.stderr)
        return fail(exc)
    print(f"new job {job['id']} ({job['state']}), a retry of {args.id}", file=sys.stderr)
    print(job["id"])
    return 0


def _retry_config(origin: dict, origin_id: str) -> dict:
    """The origin's config, tagged as its retry (an earlier retry-of tag replaced)."""
    config = dict(origin["config"])
    tags = [t for t in config.get("tags") or [] if not t.startswith(RETRY_TAG)]
    config["tags"] = [*tags, f"{RETRY_TAG}{origin_id}"]
    return config


# --- the parser -------------------------------------------------------------------------------


def _worker(subparsers) -> None:
    p = subparsers.add_parser(
        "worker",
        help="run a dispatcher: take queued jobs and run them on Ray (UNROLL_RAY_ADDRESS, or a local instance)",
    )
    p.set_defaults(func=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from workers.dispatcher import main  # imports Ray: only when the role runs

    return main()


def _job_checkpoint(reference: str):
    """`unroll generate JOB ...`: a job id (not a local path) as its latest checkpoint,
    downloaded once into .unroll/models/<job>/<step>.pt with the client's URL and token."""
    from service.cli.client import ApiError, Client

    try:
        with Client.from_config() as api:
            return api.fetch_model(reference)
    except ApiError as exc:
        raise UsageError(f"{reference}: not a local checkpoint or run folder, and as a job id: {exc.message}") from None


def build_parser(with_train: bool = True) -> argparse.ArgumentParser:
    """The whole command line. `with_train=False` stands a placeholder in for `train`,
    whose module imports torch (seconds): the client commands should start at once."""
    parser = argparse.ArgumentParser(prog="unroll", description="Truncated-BPTT training for recurrent networks.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    if with_train:
        from trainer import cli as train_cli

        train_cli.add_parser(subparsers)
    else:
        subparsers.add_parser("train", help="train a config locally, without services (see unroll train -h)")
    _db(subparsers)
    _api(subparsers)
    admin.add_parser(subparsers)
    _client_commands(subparsers)
    _worker(subparsers)
    sweep.add_parser(subparsers)
    compare.add_parser(subparsers)
    data.add_parser(subparsers)
    use_cli.add_parser(subparsers, resolve=_job_checkpoint)  # generate, predict, evaluate, export
    up.add_parser(subparsers)
    node.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(with_train=bool(argv) and argv[0] == "train").parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:  # every command's: the message, and the field it names
        return fail(exc)

