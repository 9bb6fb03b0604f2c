"""service.store.limits: the table, its overrides, and the bounds a typed config breaks
(its rendering in docs/operations.md is checked with the other generated pages,
tests/test_architecture.py)."""

from __future__ import annotations


import pytest

from service.store import limits
from service.store.settings import Settings
from trainer.config import JobConfig, parse_config

BASE = {"model": {"cell": "lstm", "hidden_size": 8}, "data": {"kind": "recall", "length": 200}}


def broken(**sections) -> list[tuple[str, str]]:
    config = parse_config({**BASE, **sections})
    return list(limits.violations(config, limits.effective({})))


def _fields_of(annotation) -> set[str]:
    """The field names of a config section (of any member of a union, for `data`)."""
    members = getattr(annotation, "__args__", None) or (annotation,)
    names: set[str] = set()
    for member in members:
        member = getattr(member, "__origin__", member)  # Annotated[...] of a union member
        names |= set(getattr(member, "model_fields", {}))
    return names


def test_every_limit_names_a_field_of_the_job_config():
    # A misspelt path would bound nothing: violations() skips what a config does not have.
    for limit in limits.FIELDS:
        section, _, field = limit.field.rpartition(".")
        if not section:
            assert field in JobConfig.model_fields, limit.field
        else:
            assert field in _fields_of(JobConfig.model_fields[section].annotation), limit.field


def test_violations_name_the_field_and_the_bound():
    assert broken() == []
    assert broken(model={"num_layers": 33}) == [("model.num_layers", "must be <= 32 (this deployment's limit: UNROLL_LIMITS)")]
    assert [f for f, _ in broken(resources={"cpus": 0.0001})] == ["resources.cpus"]  # below the floor
    assert [f for f, _ in broken(resources={"cpus": 0.12345})] == ["resources.cpus"]  # finer than Ray's step
    assert broken(resources={"cpus": 0.15, "gpus": 0.25}) == []
    # k2 follows k1, so it is past its bound too
    assert [f for f, _ in broken(max_attempts=11, tbptt={"k1": 200_000})] == ["tbptt.k1", "tbptt.k2", "max_attempts"]


def test_overrides_replace_a_bound_and_refuse_unknown_names():
    table = limits.effective({"max_attempts": 50})
    assert table["max_attempts"].high == 50 and table["model.num_layers"].high == 32
    assert list(limits.violations(parse_config({**BASE, "max_attempts": 50}), table)) == []
    for bad in ({"model.layers": 3}, {"max_attempts": 0}, {"max_attempts": float("inf")}, {"max_attempts": True}):
        with pytest.raises(ValueError, match="UNROLL_LIMITS"):
            limits.effective(bad)
    with pytest.raises(ValueError, match="no limit named model.layers"):
        Settings(limits={"model.layers": 3})
