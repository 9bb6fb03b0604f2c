"""The deployment layout, read from docker-compose.yml, so that the cluster the tests start
and the one users deploy cannot drift apart: which services exist, the `unroll` command each
role runs, how many API replicas, the `ray start` flags of the head and of a GPU node, how
many GPUs a GPU node declares, and the settings every role is given.

Every service of the compose file must be one the harness knows how to start
(`KNOWN`); a new one fails the layout test until tests/cluster starts it too."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"

# compose service -> what the harness starts for it (tests/cluster/harness.py)
KNOWN = {
    "postgres": "the machine's PostgreSQL server, a throwaway database on it",
    "redis": "the machine's Redis, under a key prefix of the cluster's own",
    "migrate": "its `unroll` command, once, before the services that need the schema",
    "api": "its `unroll` command, once per replica, each on its own port",
    "ray-head": "its `ray start --head` flags, on a free port with a short temp dir",
    "ray-worker": "its `ray start --address` flags, with its GPU reservation as --num-gpus",
    "dispatcher": "its `unroll` command (a Ray driver attached to the head's raylet)",
}


class LayoutError(ValueError):
    """docker-compose.yml holds something the cluster harness does not start."""


@dataclass(frozen=True)
class Layout:
    migrate: list[str]  # arguments of `unroll`
    api: list[str]
    api_replicas: int
    dispatcher: list[str]
    head_flags: list[str]  # arguments of `ray start`
    node_flags: list[str]
    node_gpus: int
    unroll_env: frozenset[str]  # the UNROLL_* settings the compose file gives its roles


def read_layout(path: Path = COMPOSE) -> Layout:
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    unknown = sorted(set(services) - set(KNOWN))
    if unknown:
        raise LayoutError(f"{path.name} has services the cluster tests do not start: {', '.join(unknown)} (tests/cluster/layout.py)")
    missing = sorted(set(KNOWN) - set(services))
    if missing:
        raise LayoutError(f"{path.name} lacks services the cluster tests start: {', '.join(missing)}")
    return Layout(
        migrate=_unroll_args(services["migrate"]["command"]),
        api=_unroll_args(services["api"]["command"]),
        api_replicas=int(services["api"].get("deploy", {}).get("replicas", 1)),
        dispatcher=_unroll_args(_after_exec(services["dispatcher"]["command"])),
        head_flags=_ray_start_flags(services["ray-head"]["command"]),
        node_flags=_ray_start_flags(services["ray-worker"]["command"]),
        node_gpus=_reserved_gpus(services["ray-worker"]),
        unroll_env=frozenset(k for k in services["api"]["environment"] if k.startswith("UNROLL_")),
    )


def _unroll_args(command: list[str]) -> list[str]:
    if command[0] != "unroll":
        raise LayoutError(f"expected an `unroll` command, got {command!r}")
    return list(command[1:])


def _after_exec(command: list[str]) -> list[str]:
    """`sh -c "ray start ... && exec unroll worker"` -> ["unroll", "worker"]."""
    if command[:2] != ["sh", "-c"]:
        return command
    script = command[2]
    if "exec " not in script:
        raise LayoutError(f"the dispatcher's script has no `exec` of its role: {script!r}")
    return shlex.split(script.rsplit("exec ", 1)[1])


def _ray_start_flags(command: list[str]) -> list[str]:
    if command[:2] != ["ray", "start"]:
        raise LayoutError(f"expected `ray start`, got {command!r}")
    return list(command[2:])


def _reserved_gpus(service: dict) -> int:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return sum(int(d.get("count", 0)) for d in devices if "gpu" in d.get("capabilities", []))


def flag(flags: list[str], name: str) -> str | None:
    """The value of `--name=value` in `flags` (None when absent)."""
    for item in flags:
        if item.startswith(f"--{name}="):
            return item.split("=", 1)[1]
    return None


def without(flags: list[str], *names: str) -> list[str]:
    """`flags` less every `--name` and `--name=value` of `names`."""
    return [f for f in flags if f.split("=", 1)[0].removeprefix("--") not in names]
