"""The API's errors as the client raises them (no HTTP library imported: every command's
errors are handled in one place, service.cli.main.main)."""

from __future__ import annotations


class ApiError(Exception):
    """An error answer of the API (status, code, message, the field it names), or 0
    `unreachable` when there was none. Defined here, without httpx, so that every command's
    errors are handled in one place (service.cli.main.main)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
