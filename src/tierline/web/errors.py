"""One JSON error shape for every failure: ``{"error": {"status", "code", "message"}}``.

Bad input is a 4xx that says what was wrong; a 500 is a bug, logged with its traceback
and answered without one.
"""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from psycopg_pool import PoolTimeout
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from tierline.errors import (
    DatabaseUnavailable,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    TierlineError,
    UnknownKind,
)
from tierline.logs import get_logger

log = get_logger(__name__)


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(TierlineError):
    """An HTTP error answer: ``status``, a stable ``code`` and a message, as JSON."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}

# Responses every /v1 route may give, for the OpenAPI document.
COMMON: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": CODES[s].replace("_", " ")}
    for s in (400, 401, 403, 413, 422, 503)
}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()[:20]
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"][1:] if len(first["loc"]) > 1 else first["loc"])
        return error_response(422, "invalid_request", f"{where}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = CODES.get(exc.status_code, "error")
        return error_response(
            exc.status_code,
            code,
            str(exc.detail),
            headers=dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(UnknownKind)
    async def _kind(_: Request, exc: UnknownKind) -> JSONResponse:
        return error_response(422, "unknown_kind", str(exc), {"known_kinds": exc.known})

    @app.exception_handler(InvalidJob)
    async def _invalid(_: Request, exc: InvalidJob) -> JSONResponse:
        return error_response(422, "invalid_job", str(exc))

    @app.exception_handler(JobNotFound)
    async def _missing(_: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(InvalidTransition)
    async def _conflict(_: Request, exc: InvalidTransition) -> JSONResponse:
        return error_response(409, "conflict", str(exc))

    @app.exception_handler(PoolTimeout)
    async def _pool(_: Request, exc: PoolTimeout) -> JSONResponse:
        return error_response(
            503,
            "pool_exhausted",
            "no database connection became free in time; retry shortly",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(DatabaseUnavailable)
    async def _db(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return error_response(503, "database_unavailable", str(exc), headers={"Retry-After": "2"})

    # Database errors get handlers of their own: what the catch-all `Exception` handler
    # answers, Starlette re-raises afterwards (uvicorn then logs a traceback and drops the
    # keep-alive connection), which is right for bugs only.
    async def _unreachable(_: Request, exc: Exception) -> JSONResponse:
        return error_response(
            503,
            "database_unavailable",
            "the database is unreachable; retry shortly",
            headers={"Retry-After": "2"},
        )

    async def _rejected(_: Request, exc: Exception) -> JSONResponse:
        first = str(exc).splitlines()[0] if str(exc) else "invalid"
        return error_response(422, "invalid_request", f"rejected by the database: {first}")

    for unreachable in (psycopg.OperationalError, psycopg.InterfaceError):
        app.add_exception_handler(unreachable, _unreachable)
    for rejected in (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded):
        app.add_exception_handler(rejected, _rejected)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path)
        return error_response(500, "internal", "internal error")
