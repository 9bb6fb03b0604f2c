"""The security tests drive the real app like the API tests do: the same fixtures."""

from tests.api.conftest import app, client, data_root, db, make_token, settings  # noqa: F401
