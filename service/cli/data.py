"""Deleting what a project no longer needs, and its datasets: `unroll delete JOB_ID`,
`unroll dataset upload FILE [--name NAME]`, `unroll dataset list`, `unroll dataset show ID`,
`unroll dataset delete ID`. Client commands: the HTTP API does the work (and refuses what
it must: a queued or running job, a dataset in use, an upload over the project's quota).

What a script reads is on stdout (the new dataset's id, the table, the fields); notes go
to stderr. An API error is one `error:` line and exit 1; bad input here, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli.common import (
    UsageError,
    add_client_args,
    open_client,
    table,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "delete", help="delete a finished job and everything it produced (metrics, logs, checkpoints)"
    )
    p.add_argument("id", help="the job's id (a queued or running job must be cancelled first)")
    add_client_args(p)
    p.set_defaults(func=delete_job)

    p = subparsers.add_parser("dataset", help="upload, list, show and delete the project's datasets")
    sub = p.add_subparsers(dest="dataset_command", required=True)
    upload = sub.add_parser("upload", help="upload a file (streamed); prints the new dataset's id last")
    upload.add_argument("file", type=Path)
    upload.add_argument("--name", default=None, help="its name in the service (default: the file's name)")
    add_client_args(upload)
    upload.set_defaults(func=upload_dataset)
    listing = sub.add_parser("list", help="the project's datasets, newest first")
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (1 to 1000)")
    add_client_args(listing)
    listing.set_defaults(func=list_datasets)
    show = sub.add_parser("show", help="one dataset's fields")
    show.add_argument("id")
    add_client_args(show)
    show.set_defaults(func=show_dataset)
    delete = sub.add_parser("delete", help="delete a dataset that no queued or running job uses")
    delete.add_argument("id")
    add_client_args(delete)
    delete.set_defaults(func=delete_dataset)


def delete_job(args: argparse.Namespace) -> int:
    with open_client(args) as api:
        api.delete(args.id)
    print(f"{args.id} deleted")
    return 0


def upload_dataset(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise UsageError(f"{args.file}: no such file")
    try:
        with open_client(args) as api:
            dataset = api.upload_dataset(args.file, name=args.name)
    except OSError as exc:  # the file went away or cannot be read while streaming
        raise UsageError(f"{args.file}: {exc.strerror or exc}") from None
    print(f"uploaded {dataset['name']}: {dataset['bytes']:,} bytes, sha256 {dataset['sha256']}", file=sys.stderr)
    print(dataset["id"])
    return 0


def list_datasets(args: argparse.Namespace) -> int:
    with open_client(args) as api:
        datasets = api.datasets(limit=args.limit)
    rows = [[d["id"], d["name"], f"{d['bytes']:,}", _when(d["created_at"]), d["sha256"][:12]] for d in datasets]
    print(table(rows, ["ID", "NAME", "BYTES", "CREATED", "SHA256"]) if rows else "no datasets")
    return 0


def show_dataset(args: argparse.Namespace) -> int:
    with open_client(args) as api:
        dataset = api.dataset(args.id)
    fields = [("id", dataset["id"]), ("name", dataset["name"]), ("bytes", f"{dataset['bytes']:,}"),
              ("sha256", dataset["sha256"]), ("created", _when(dataset["created_at"]))]
    for key, value in fields:
        print(f"{key.ljust(7)}  {value}")
    return 0


def delete_dataset(args: argparse.Namespace) -> int:
    with open_client(args) as api:
        api.delete_dataset(args.id)
    print(f"{args.id} deleted")
    return 0


def _when(stamp: str | None) -> str:
    return stamp.replace("T", " ")[:19] if stamp else "-"
