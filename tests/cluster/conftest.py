"""One cluster in the compose layout (tests/cluster/harness.py) for all of tests/cluster,
started once and shared by the scenarios in order (each leaves it whole for the next: a
node it kills is started again, a dispatcher it kills is replaced). Started without its GPU
node: the first scenario has a GPU job wait for one to join.

- ``cluster``: the running Cluster (``.nodes``, ``.apis``, ``.dispatchers``, ``.kill_raylet``...)
- ``api``: a ``Replicas`` client rotating between the API replicas
- ``records``: the database's account of jobs (``Records``)
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.cluster.harness import Cluster
from tests.cluster.jobs import Records, Replicas
from tests.cluster.layout import read_layout
from tests.conftest import RedisServer
from tests.processes import create_postgres_database, drop_postgres_database


@pytest.fixture(scope="session")
def cluster_database() -> Iterator[str]:
    try:
        url = create_postgres_database("unroll_cluster")
    except psycopg.Error as exc:
        pytest.skip(f"the cluster tests need the PostgreSQL server (UNROLL_TEST_POSTGRES_URL): {exc}")
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(scope="session")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    """A redis-server of the cluster's own, which a scenario may crash and restart; None
    where none can start (the cluster then uses the shared one, and that scenario skips)."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("cluster-redis")).start()
    except RuntimeError:
        yield None
        return
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, cluster_database: str, cluster_redis: RedisServer | None,
            redis_url: str) -> Iterator[Cluster]:
    url = cluster_redis.url if cluster_redis is not None else redis_url
    running = Cluster(tmp_path_factory.mktemp("cluster"), cluster_database, url, read_layout())
    running.redis_server = cluster_redis
    try:
        running.start(gpu_node=False)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Iterator[Replicas]:
    client = Replicas([f"http://127.0.0.1:{a.port}" for a in cluster.apis], cluster.token)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def records(cluster: Cluster) -> Iterator[Records]:
    found = Records(cluster.database_url)
    try:
        yield found
    finally:
        found.close()
