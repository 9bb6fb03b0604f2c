"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every command
of ours parses with the real `unroll` parser (or is a `ray start` that joins the head),
every UNROLL_* variable is a setting, every dependency is waited for by its health, and
the pieces the deployment promises are there."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.cli.main import build_parser
from service.store.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
THIRD_PARTY_IMAGES = ("postgres:", "redis:")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def ours(service: dict) -> bool:
    return not str(service.get("image", "")).startswith(THIRD_PARTY_IMAGES)


def one_shot(service: dict) -> bool:
    return service.get("restart") == "no"


def invocations(command) -> list[list[str]]:
    """The programs a command runs: itself, or each `&&`/`;` part of an `sh -c` script."""
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if argv[:2] == ["sh", "-c"]:
        assert len(argv) == 3, argv
        parts = re.split(r"&&|;", argv[2])
        return [[a for a in shlex.split(p) if a != "exec"] for p in parts if p.strip()]
    return [argv]


def ray_flags(argv: list[str]) -> dict[str, str | bool]:
    flags: dict[str, str | bool] = {}
    for arg in argv[2:]:
        name, eq, value = arg.partition("=")
        flags[name] = value if eq else True
    return flags


def test_the_promised_services_are_there(services):
    assert {"postgres", "redis", "migrate", "api", "ray-head", "ray-worker", "dispatcher"} <= set(services)


def test_every_command_of_ours_is_a_real_cli_invocation_or_a_ray_start(services):
    parser = build_parser(with_train=False)
    head_port = None
    for name, service in services.items():
        if not ours(service):
            continue
        assert "command" in service, f"{name}: no command"
        for argv in invocations(service["command"]):
            if argv[0] == "unroll":
                try:
                    args = parser.parse_args(argv[1:])
                except SystemExit:
                    pytest.fail(f"{name}: `{shlex.join(argv)}` is not a valid unroll command")
                assert callable(args.func), name
            elif argv[:2] == ["ray", "start"]:
                flags = ray_flags(argv)
                assert "--block" in flags or name == "dispatcher", f"{name}: ray start must stay in the foreground"
                if "--head" in flags:
                    head_port = flags["--port"]
            else:
                pytest.fail(f"{name}: `{shlex.join(argv)}` is neither ours nor a ray start")
    assert head_port, "no ray start --head"
    # Everything that joins Ray joins that head, and UNROLL_RAY_ADDRESS points at it.
    for name, service in services.items():
        if not ours(service):
            continue
        for argv in invocations(service["command"]):
            if argv[:2] == ["ray", "start"] and "--head" not in argv:
                assert ray_flags(argv)["--address"] == f"ray-head:{head_port}", name
        address = (service.get("environment") or {}).get("UNROLL_RAY_ADDRESS")
        if address is not None:
            assert address == f"ray-head:{head_port}", name


def test_the_roles_run_what_they_are_named_for(services):
    def runs(name: str) -> list[list[str]]:
        return invocations(services[name]["command"])

    assert runs("migrate") == [["unroll", "db", "upgrade"]]
    assert runs("api")[0][:2] == ["unroll", "api"] and "0.0.0.0" in runs("api")[0]
    assert runs("dispatcher")[-1] == ["unroll", "worker"]
    assert "--head" in runs("ray-head")[0]


def test_every_unroll_variable_is_a_setting(services):
    fields = {f"UNROLL_{name}".upper() for name in Settings.model_fields}
    seen = set()
    for name, service in services.items():
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: use the mapping form of environment"
        for key in environment:
            if key.startswith("UNROLL_"):
                seen.add(key)
                assert key in fields, f"{name}: {key} is not a field of service.store.settings.Settings"
    assert {"UNROLL_DATABASE_URL", "UNROLL_REDIS_URL", "UNROLL_RAY_ADDRESS", "UNROLL_ARTIFACTS"} <= seen


def test_database_url_points_at_the_postgres_service(services):
    for name in ("migrate", "api", "dispatcher"):
        url = services[name]["environment"]["UNROLL_DATABASE_URL"]
        assert url.startswith("postgresql://") and "@postgres:5432/" in url, name
        redis_url = services[name]["environment"]["UNROLL_REDIS_URL"]
        assert redis_url.startswith("redis://:${REDIS_PASSWORD:?") and redis_url.endswith("@redis:6379/0"), name


def test_health_checks_and_dependencies(services):
    for name, service in services.items():
        if one_shot(service):
            assert "healthcheck" not in service or service["healthcheck"].get("disable"), name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name}: no health check"
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
        for arg in test:
            if arg.count("\n") > 1:  # an inline Python script: at least it must compile
                compile(arg, f"{name}-healthcheck", "exec")
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if one_shot(services[target]):
                assert condition == "service_completed_successfully", (name, target)
            else:
                assert condition == "service_healthy", (name, target)
                assert services[target].get("healthcheck"), f"{name} waits for {target}, which has no health check"


def test_the_schema_exists_before_anything_uses_it(services):
    for name in ("api", "dispatcher"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_gpu_worker_api_replicas_and_persistence(compose, services):
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices)
    assert services["api"]["deploy"]["replicas"] == 2
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    # Redis asks for the password the services' URLs carry, and its health check uses it.
    assert redis_command[redis_command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in services["postgres"]["volumes"])
    assert any(v.split(":")[1] == "/data" for v in services["redis"]["volumes"])
    assert {"postgres", "redis", "artifacts"} <= set(compose["volumes"])
    # Checkpoints are written on Ray nodes and served by the API: one shared store.
    for name in ("api", "ray-head", "ray-worker", "dispatcher"):
        assert "artifacts:/data/artifacts" in services[name]["volumes"], name


def test_ray_nodes_and_the_dispatcher_share_the_cluster_token(services):
    for name in ("ray-head", "ray-worker", "dispatcher"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env, name


def test_dockerfile_builds_what_compose_runs():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM ", text, re.M)
    assert "constraints.txt" in text and "torch==2.13.0" in text
    assert "pip install -c constraints.txt -e ." in text  # alembic.ini and migrations/ beside the code
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for path in line.split()[:-1]:
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".unroll", ".git", ".env"} <= set(ignored)
