"""`unroll token` and `unroll project`: what an operator does straight in the database, like
the /v1/admin routes (service.api.routes.admin) do over HTTP: tokens (create, list, revoke)
and projects' quotas (set, list). A change that API processes cache (a revoked token, a new
quota) is announced on Redis, so every replica applies it at its next request."""

from __future__ import annotations

import argparse
import re
import sys

from service.cli.common import UsageError, parse_duration, table
from service.store import limits


def _project_name(text: str) -> str:
    if len(text) > limits.PROJECT_NAME_MAX or not re.match(limits.PROJECT_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r}: a project name is 1 to {limits.PROJECT_NAME_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return text


def add_parser(subparsers) -> None:
    _token(subparsers)
    _project(subparsers)


def _token(subparsers) -> None:
    p = subparsers.add_parser("token", help="API tokens (straight in the database, like the admin routes)")
    sub = p.add_subparsers(dest="token_command", required=True)
    create = sub.add_parser("create", help="create a project (if needed) and a token; prints the token last")
    create.add_argument("--project", required=True, type=_project_name)
    create.add_argument("--name", default=None, help="a label for the token")
    create.add_argument("--expires", default=None, type=parse_duration, metavar="DURATION",
                        help="it stops working after this long: 90m, 12h, 30d, 52w (default: never)")
    create.set_defaults(func=_token_create)
    listing = sub.add_parser("list", help="the tokens (never their secrets), newest first")
    listing.add_argument("--project", default=None, help="only this project's")
    listing.set_defaults(func=_token_list)
    revoke = sub.add_parser("revoke", help="revoke a token: refused on its next request, on every API replica")
    revoke.add_argument("id", help="the token's id (tok_..., from `unroll token list`)")
    revoke.set_defaults(func=_token_revoke)


def _in_database(work):
    """Run work(session) in one transaction of the configured database; exit 2 if it is down."""
    from service.store.db.errors import DatabaseUnavailable
    from service.store.db.session import session_scope

    try:
        with session_scope() as session:
            return work(session)
    except DatabaseUnavailable as exc:
        raise UsageError(str(exc)) from None


def _token_create(args: argparse.Namespace) -> int:
    from service.store.db import repo
    from service.store.db.base import utcnow

    expires_at = utcnow() + args.expires if args.expires is not None else None

    def create(session):
        project = repo.get_or_create_project(session, args.project)
        secret, _ = repo.create_token(session, project.id, name=args.name, expires_at=expires_at)
        return project.id, secret

    project_id, secret = _in_database(create)
    until = f", expires {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""
    print(f"project {args.project} ({project_id}): new token (shown once{until})", file=sys.stderr)
    print(secret)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from service.store.db import repo

    def rows(session):
        return [
            [t.id, name, t.name or "-", _stamp(t.created_at), _stamp(t.last_used_at), _stamp(t.expires_at), _stamp(t.revoked_at)]
            for t, name in repo.list_tokens(session, args.project)
        ]

    found = _in_database(rows)
    print(table(found, ["ID", "PROJECT", "NAME", "CREATED", "LAST USED", "EXPIRES", "REVOKED"]) if found else "no tokens")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from service.store import revocations
    from service.store.db import repo
    from service.store.db.errors import NotFound
    from service.store.keys import Keys
    from service.store.settings import get_settings

    def revoke(session):
        token_hash = repo.revoke_token(session, args.id)
        repo.get_token(session, args.id)  # NotFound for an unknown id
        return token_hash

    try:
        token_hash = _in_database(revoke)
    except NotFound:
        raise UsageError(f"no token {args.id!r} (see unroll token list)") from None
    if token_hash is None:
        print(f"{args.id} was already revoked")
        return 0
    settings = get_settings()
    if not revocations.announce_sync(settings.redis_url, Keys(settings.redis_prefix), token_hash):
        print("note: Redis did not answer; API processes forget cached tokens when they reach it again", file=sys.stderr)
    print(f"{args.id} revoked")
    return 0


def _stamp(when) -> str:
    return when.strftime("%Y-%m-%d %H:%M") if when is not None else "-"


def _project(subparsers) -> None:
    p = subparsers.add_parser("project", help="projects and their quotas (straight in the database, like the admin routes)")
    sub = p.add_subparsers(dest="project_command", required=True)
    put = sub.add_parser(
        "set",
        help="set a project's quota (the project too, if needed)",
        description="Each bound given is set; 'default' puts it back to the deployment's default (or no bound).",
    )
    put.add_argument("name", type=_project_name)
    for flag, kind, text in (
        ("--max-running", int, "jobs running at once (0 pauses the project)"),
        ("--max-cpus", float, "CPUs its running jobs hold at once"),
        ("--max-gpus", float, "GPUs its running jobs hold at once"),
        ("--max-priority", int, "the highest priority its jobs may ask for"),
        ("--max-queued", int, "jobs it may have queued"),
    ):
        put.add_argument(flag, type=_bound(kind), default=_UNSET, metavar="N|default", help=text)
    put.set_defaults(func=_project_set)
    listing = sub.add_parser("list", help="every project: its quota and what it holds now")
    listing.set_defaults(func=_project_list)


_UNSET = object()


def _bound(kind):
    def parse(text: str):
        if text == "default":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number or 'default': {text!r}") from None

    return parse


def _project_set(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.api.schemas import QuotaUpdate
    from service.store import revocations
    from service.store.keys import Keys
    from service.store.settings import get_settings

    given = {name: getattr(args, name) for name in ("max_running", "max_cpus", "max_gpus", "max_priority", "max_queued")}
    try:
        changes = QuotaUpdate(**{k: v for k, v in given.items() if v is not _UNSET}).changes()
    except ValidationError as exc:
        raise UsageError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())) from None
    if not changes:
        raise UsageError("give at least one of --max-running, --max-cpus, --max-gpus, --max-priority, --max-queued")
    from service.store.db import repo

    def put(session):
        project = repo.set_quota(session, args.name, changes)
        return project.id, repo.quota_of(project)

    project_id, quota = _in_database(put)
    settings = get_settings()
    if not revocations.announce_project_sync(settings.redis_url, Keys(settings.redis_prefix), project_id):
        print("note: Redis did not answer; API processes apply the quota when their cached tokens expire", file=sys.stderr)
    shown = ", ".join(f"{k}={_shown(getattr(quota, k))}" for k in ("max_running", "max_cpus", "max_gpus", "max_priority", "max_queued"))
    print(f"project {args.name} ({project_id}): {shown}")
    return 0


def _project_list(args: argparse.Namespace) -> int:
    from service.store.db import repo
    from service.store.quotas import NOTHING

    def rows(session):
        usage, queued = repo.project_usage(session), repo.count_queued_by_project(session)
        out = []
        for p in repo.list_projects(session):
            u = usage.get(p.id, NOTHING)
            out.append([
                p.name, p.id, f"{u.running}/{_shown(p.max_running)}", f"{u.cpus:g}/{_shown(p.max_cpus)}",
                f"{u.gpus:g}/{_shown(p.max_gpus)}", f"{queued.get(p.id, 0)}/{_shown(p.max_queued)}", _shown(p.max_priority),
            ])
        return out

    found = _in_database(rows)
    print(table(found, ["PROJECT", "ID", "RUNNING", "CPUS", "GPUS", "QUEUED", "MAX PRIORITY"]) if found else "no projects")
    return 0


def _shown(value) -> str:
    if value is None:
        return "default"
    return f"{value:g}" if isinstance(value, float) else str(value)
