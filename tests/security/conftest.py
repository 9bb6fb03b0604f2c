"""The security tests drive the real app and the real workers as the API and worker tests
do: the same fixtures."""

from tests.api.conftest import app, client, data_root, db, make_token, settings  # noqa: F401
from tests.workers.conftest import ray_address, stack  # noqa: F401
