"""Every error of the API, mapped once to SPEC §5's JSON shape:

    {"error": {"code": "...", "message": "...", "field": "dotted.path"?}}

Routes raise ``ApiError`` (or a subclass) or let a typed error of another layer escape
(``service.store.db.errors``, ``trainer.config.ConfigError``, Redis connection errors); the
handlers installed by ``install`` turn each into one response. Nothing the client sends can
produce a 500: bad input is 400/413/422, and an unexpected exception is logged and answered
with a 500 that says nothing about internals.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions as redis_errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.store.db.errors import DatabaseUnavailable, IllegalTransition, InUse, NotFound
from service.store.sweeps import InvalidGrid
from trainer.config import ConfigError

log = logging.getLogger("unroll.api")


# --- the schema of an error body (OpenAPI) --------------------------------------------------


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    # The dotted path of the offending field, when one field is to blame.
    field: str | None = None
    # Every problem found, when there are several (validation).
    errors: list[FieldProblem] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Bad input (malformed JSON, bad cursor)",
    401: "No token, or an unknown, revoked or expired one",
    404: "Unknown object, or another project's",
    408: "The client sent nothing for too long during an upload (UNROLL_UPLOAD_READ_TIMEOUT_S)",
    409: "The object is not in a state this action starts from",
    413: "Request body or upload too large",
    422: "Invalid input; `field` names the dotted path",
    429: "Over a quota of the project (queued jobs, dataset storage)",
    503: "A dependency (database or Redis) is down",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each status with the error schema (for OpenAPI)."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


# --- errors raised by routes ------------------------------------------------------------------


class ApiError(StarletteHTTPException):
    """An error answered as-is. A subclass of Starlette's HTTPException so that it passes
    through FastAPI's body parsing untouched (a 413 raised while the body is read stays 413)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        errors: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.field = field
        self.errors = errors


class Unauthorized(ApiError):
    def __init__(self, message: str = "missing or invalid bearer token") -> None:
        super().__init__(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(ApiError):
    def __init__(self, limit: int, what: str = "request body") -> None:
        super().__init__(413, "too_large", f"{what} is larger than {limit} bytes")


class Invalid(ApiError):
    """422 naming one field (or several: `errors`, the first one is `field`)."""

    def __init__(self, field: str | None, message: str, errors: list[tuple[str, str]] | None = None) -> None:
        super().__init__(422, "invalid", f"{field}: {message}" if field else message, field, errors)


def config_invalid(exc: ConfigError, prefix: str = "") -> Invalid:
    """A ConfigError as a 422: every (path, message), the first one as `field`."""
    errors = [(f"{prefix}{path}" if path else prefix.rstrip("."), msg) for path, msg in exc.errors]
    field, message = errors[0]
    return Invalid(field or None, message, errors if len(errors) > 1 else None)


# --- the handlers -----------------------------------------------------------------------------


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    errors: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    detail: dict[str, Any] = {"code": code, "message": message}
    if field:
        detail["field"] = field
    if errors:
        detail["errors"] = [{"field": f, "message": m} for f, m in errors]
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


# Statuses Starlette itself raises (routing, methods), with our codes.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "over_quota",
    503: "unavailable",
}


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    # ("body", "grid", "tbptt.k1", 0) -> "grid.tbptt.k1.0"; ("query", "limit") -> "limit"
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts)


def _validation_message(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "json_invalid":
        return f"invalid JSON: {(err.get('ctx') or {}).get('error', 'decode error')}"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status_code, exc.code, exc.message, exc.field, exc.errors, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, ApiError):
        return await _api_error(request, exc)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [(_field_of(err.get("loc", ())), _validation_message(err)) for err in exc.errors()]
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        return error_response(400, "invalid_json", problems[0][1])
    field, message = problems[0] if problems else ("", "invalid request")
    return error_response(
        422, "invalid", f"{field}: {message}" if field else message, field or None,
        problems if len(problems) > 1 else None,
    )


async def _config_invalid(request: Request, exc: ConfigError) -> JSONResponse:
    return await _api_error(request, config_invalid(exc))


async def _grid_invalid(request: Request, exc: InvalidGrid) -> JSONResponse:
    return await _api_error(request, Invalid(exc.field, exc.message))


async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return error_response(404, "not_found", f"{exc.kind} {exc.object_id!r} not found")


async def _conflict(request: Request, exc: IllegalTransition) -> JSONResponse:
    return error_response(409, "conflict", f"job {exc.job_id!r} is {exc.current}; cannot {exc.wanted}")


async def _in_use(request: Request, exc: InUse) -> JSONResponse:
    return error_response(409, "conflict", (
        f"{exc.kind} {exc.object_id!r} is in use by queued or running jobs ({', '.join(exc.users)}): wait for them to"
        " end, or cancel them"
    ))


async def _database_down(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return error_response(503, "unavailable", "the database is unavailable", headers={"Retry-After": "5"})


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable: %s", exc)
    return error_response(503, "unavailable", "Redis is unavailable", headers={"Retry-After": "5"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "internal error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(ConfigError, _config_invalid)
    app.add_exception_handler(InvalidGrid, _grid_invalid)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(IllegalTransition, _conflict)
    app.add_exception_handler(InUse, _in_use)
    app.add_exception_handler(DatabaseUnavailable, _database_down)
    app.add_exception_handler(redis_errors.ConnectionError, _redis_down)
    app.add_exception_handler(redis_errors.TimeoutError, _redis_down)
    app.add_exception_handler(Exception, _unexpected)
