"""What makes a job configuration acceptable to this deployment, beyond its schema.

``trainer.config.parse_config`` decides whether a config is well formed (the very check the
trainer runs); this module adds the service's own rules: the per-field limits of service.store.limits,
the model-size cap, data paths
only inside ``UNROLL_DATA_ROOTS``, datasets of the caller's project, and numbers that fit
the database columns. Errors are 422s naming the field, with a `prefix` for configs nested
in a request (a sweep's `base.`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from service.api.errors import ApiError, Invalid, config_invalid
from service.store import limits, quotas
from service.store.db import repo
from service.store.db.base import unstorable
from service.store.db.errors import NotFound
from service.store.quotas import NO_QUOTA, Quota
from service.store.sweeps import get_path
from service.store.settings import Settings
from trainer.config import (
    ConfigError,
    JobConfig,
    config_dict,
    data_bytes,
    parameter_count,
    parse_config,
)

# jobs.priority is a 32-bit column; the queue scores priorities as doubles.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
# jobs.max_steps is a 64-bit column.
MAX_STEPS_LIMIT = 2**63 - 1


class BadJson(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(400, "invalid_json", message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(body: bytes) -> Any:
    """JSON text to a value: 400 for malformed JSON or NaN/Infinity, 422 naming the part no
    database column can hold (a NUL character, a number such as 1e999 that reads as infinity)."""
    if not body.strip():
        raise BadJson("the request body is empty; send a JSON object")
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadJson(f"invalid JSON: {exc}") from None
    bad = unstorable(value)
    if bad is not None:
        raise Invalid(bad[0] or None, bad[1])
    return value


async def read_json(request: Request) -> Any:
    return loads(await request.body())


def check_config(raw: Any, settings: Settings, prefix: str = "", quota: Quota = NO_QUOTA) -> JobConfig:
    """parse_config plus this deployment's rules (see the module docstring), and the
    project's `quota` (its priority ceiling; a job it could never run)."""
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        raise config_invalid(exc, prefix) from None
    low, high = PRIORITY_RANGE
    if not low <= config.priority <= high:
        raise Invalid(f"{prefix}priority", f"must be between {low} and {high}")
    ceiling = quotas.priority_ceiling(quota, settings.max_priority)
    if config.priority > ceiling:
        raise Invalid(f"{prefix}priority", f"must be <= {ceiling}, this project's ceiling (max_priority)")
    resources = config.resources
    never = quotas.never_fits(quota, resources.cpus * resources.workers, resources.gpus * resources.workers)
    if never is not None:
        raise Invalid(f"{prefix}{never[0]}", never[1])
    if config.train.max_steps is not None and config.train.max_steps > MAX_STEPS_LIMIT:
        raise Invalid(f"{prefix}train.max_steps", f"must be <= {MAX_STEPS_LIMIT}")
    table = limits.effective(settings.limits)
    for field, message in limits.violations(config, table):
        if isinstance(raw, dict) and get_path(raw, field) is None:  # the config's own default broke it
            message += f"; {field} was not set, and the default the config gives it is over the limit: set it"
        raise Invalid(f"{prefix}{field}", message)
    if config.train.max_wall_s is None:  # every job ends: a job that sets no limit gets the deployment's
        config.train.max_wall_s = table["train.max_wall_s"].high
    params = parameter_count(config)
    if params > settings.max_params:
        raise Invalid(
            f"{prefix}model",
            f"the model has {params:,} parameters; this service allows at most {settings.max_params:,}"
            " (UNROLL_MAX_PARAMS): lower model.hidden_size, num_layers or embedding_dim",
        )
    data = config.data
    for name in ("path", "valid_path"):
        value = data_field(config, name)
        if value is not None:
            resolved = inside_data_roots(value, settings.data_roots)
            if resolved is None:
                roots = ", ".join(str(r) for r in settings.data_roots) or "none configured"
                raise Invalid(
                    f"{prefix}data.{name}",
                    f"must be a file inside the data roots (UNROLL_DATA_ROOTS: {roots}); use data.dataset to upload",
                )
            # Store the resolved path: what the API checked is what the worker opens.
            setattr(data, name, str(resolved))
    if not uses_uploads(config):  # with an upload, check_dataset counts the bytes
        check_data_bytes(config, settings, _files_bytes(config), prefix)
    return config


UPLOADS = (("dataset", "sha256"), ("valid_dataset", "valid_sha256"))  # (id field, its pin)


def uses_uploads(config: JobConfig) -> bool:
    return any(data_field(config, field) is not None for field, _ in UPLOADS)


def has_references(config: JobConfig) -> bool:
    """The config names rows that check_references must read: uploads, a trained job."""
    return config.kind == "evaluate" or uses_uploads(config)


def _files_bytes(config: JobConfig) -> int:
    return sum(_size(Path(data_field(config, name))) for name in ("path", "valid_path") if data_field(config, name))


def data_field(config: JobConfig, name: str) -> Any:
    """`config.data.<name>`, or None where this kind of data has no such field. (Asked
    with getattr's default, a pydantic model raises and catches an AttributeError through
    its metaclass: a measurable part of a submission's CPU time.)"""
    data = config.data
    return getattr(data, name) if name in type(data).model_fields else None


def inside_data_roots(path: str, roots: list[Path]) -> Path | None:
    """`path` with every symlink and `..` resolved, if that lies inside one of `roots`
    (also resolved); None otherwise. A relative path is taken relative to each root."""
    if not path or "\x00" in path:
        return None
    candidate = Path(path)
    for root in roots:
        real_root = Path(os.path.realpath(root))
        target = candidate if candidate.is_absolute() else real_root / candidate
        real = Path(os.path.realpath(target))
        if real == real_root or real.is_relative_to(real_root):
            if real != real_root:
                return real
    return None


async def check_references(
    session: AsyncSession, config: JobConfig, project_id: str, settings: Settings, prefix: str = "",
    known: dict[str, Any] | None = None,
) -> None:
    """What the config names exists in the project (check_evaluated, check_uploads)."""
    if config.kind == "evaluate":
        await check_evaluated(session, config, project_id, prefix)
    await check_uploads(session, config, project_id, settings, prefix, known)


async def check_evaluated(session: AsyncSession, config: JobConfig, project_id: str, prefix: str = "") -> None:
    """`evaluate.job` is a job of the project with the checkpoint `evaluate.step`; without
    a step, its latest is pinned in the config (the evaluation is then reproducible)."""
    assert config.evaluate is not None
    target = config.evaluate
    try:
        await session.run_sync(repo.get_job, target.job, project_id)
    except NotFound:
        raise Invalid(f"{prefix}evaluate.job", f"no job {target.job!r} in this project") from None
    if target.step is None:
        latest = await session.run_sync(repo.latest_checkpoint, target.job)
        if latest is None:
            raise Invalid(f"{prefix}evaluate.job", f"job {target.job!r} has no checkpoint yet: nothing to evaluate")
        target.step = latest.step
        return
    try:
        await session.run_sync(repo.get_checkpoint, target.job, target.step)
    except NotFound:
        raise Invalid(f"{prefix}evaluate.step", f"job {target.job!r} has no checkpoint at step {target.step}") from None


async def check_uploads(
    session: AsyncSession, config: JobConfig, project_id: str, settings: Settings, prefix: str = "",
    known: dict[str, Any] | None = None,
) -> None:
    """The config's uploads (`data.dataset`, `data.valid_dataset`) are datasets of the
    project; their sha256 is pinned in the config (a given pin must match: 422 otherwise)
    and their size counts against UNROLL_MAX_DATA_BYTES. `known` caches the records
    across the configs of one sweep."""
    if not uses_uploads(config):
        return
    known = {} if known is None else known
    total = _files_bytes(config)
    for field, pin in UPLOADS:
        dataset_id = data_field(config, field)
        if dataset_id is None:
            continue
        if dataset_id not in known:
            try:
                known[dataset_id] = await session.run_sync(repo.get_dataset, dataset_id, project_id)
            except NotFound:
                raise Invalid(f"{prefix}data.{field}", f"no dataset {dataset_id!r} in this project (POST /v1/datasets)") from None
        dataset = known[dataset_id]
        pinned = data_field(config, pin)
        if pinned is not None and pinned != dataset.sha256:
            raise Invalid(f"{prefix}data.{pin}", f"dataset {dataset_id!r} has sha256 {dataset.sha256}, not {pinned}")
        setattr(config.data, pin, dataset.sha256)
        total += dataset.bytes
    check_data_bytes(config, settings, total, prefix)


def check_data_bytes(config: JobConfig, settings: Settings, source_bytes: int | None, prefix: str = "") -> None:
    """The memory the job's data will take on a worker, against UNROLL_MAX_DATA_BYTES."""
    needed = data_bytes(config, source_bytes)
    if needed is not None and needed > settings.max_data_bytes:
        raise Invalid(
            f"{prefix}data",
            f"the data would take about {needed / 2**30:,.1f} GiB of a worker's memory; this service allows"
            f" {settings.max_data_bytes / 2**30:,.1f} GiB (UNROLL_MAX_DATA_BYTES): use fewer or shorter episodes or streams, or a smaller file",
        )


def _size(path: Path) -> int:
    """A data file's size; 0 when it is missing (the worker then says so)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def job_fields(config: JobConfig) -> dict[str, Any]:
    """The columns of a job that come from its validated config (repo.create_job and
    repo.new_job_values take them as keywords)."""
    return {
        "config": config_dict(config),
        "name": config.name,
        "tags": config.tags,
        "priority": config.priority,
        "max_attempts": config.max_attempts,
        "max_steps": config.train.max_steps if config.kind == "train" else None,  # an evaluation makes no updates
    }
