"""Every error an endpoint can end in, mapped to an HTTP status in one table.

Bodies are JSON: `{"detail": message}`, and for a bad request also `{"errors": [{"field",
"reason"}]}`, the shape a spec error (422) has too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from domain.errors import (
    ConcurrencyConflictError,
    FieldError,
    IdempotencyConflictError,
    InvalidTransitionError,
    JobNotFoundError,
    JobSpecError,
    JobTerminalError,
)
from gateway.db import MissingTableError
from trainer.modelstore import IntegrityError as ModelIntegrityError
from trainer.modelstore import ObjectNotFoundError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than success, with its status, message and field errors."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: list[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = dict(headers or {})
        super().__init__(detail)


class NotAuthenticatedError(ApiError):
    """No token, a malformed one, or one that is unknown or revoked."""

    def __init__(self, detail: str, *, invalid_token: bool) -> None:
        challenge = 'Bearer error="invalid_token"' if invalid_token else "Bearer"
        super().__init__(401, detail, headers={"WWW-Authenticate": challenge})


def bad_request(field: str, reason: str) -> ApiError:
    """A 400 naming the query parameter or header at fault."""
    return ApiError(400, f"{field}: {reason}", [FieldError(field, reason)])


def error_response(
    status: int,
    detail: str,
    errors: list[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The JSON body every error has."""
    body: dict[str, object] = {"detail": detail}
    if errors:
        body["errors"] = [{"field": e.field, "reason": e.reason} for e in errors]
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


# Domain and model store errors -> status. A job that is not the
# caller's is reported exactly like one that does not exist, so ids do not leak.
STATUSES: dict[type[Exception], int] = {
    JobSpecError: 422,
    JobNotFoundError: 404,
    JobTerminalError: 409,
    InvalidTransitionError: 409,
    IdempotencyConflictError: 409,
    ConcurrencyConflictError: 503,
    ObjectNotFoundError: 404,
    ModelIntegrityError: 502,
    MissingTableError: 503,
    RedisConnectionError: 503,
    RedisTimeoutError: 503,
}


def _domain_error(_request: Request, exc: Exception) -> Response:
    status = next(s for t, s in STATUSES.items() if isinstance(exc, t))
    if isinstance(exc, JobSpecError):
        return error_response(422, "the job spec is invalid", exc.errors)
    if isinstance(exc, JobNotFoundError):
        return error_response(404, "no such job")
    if isinstance(exc, ObjectNotFoundError):
        return error_response(404, "the job's model is missing from the model store")
    if isinstance(exc, ModelIntegrityError):
        return error_response(502, "the stored model does not match its sha256")
    if isinstance(exc, MissingTableError):
        return error_response(
            503,
            "the job board is not there yet: is the projections process running?",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        log.warning("Redis does not answer: %s: %s", type(exc).__name__, exc)
        return error_response(
            503,
            "Redis (live node presence and job updates) does not answer; try again shortly",
            headers={"Retry-After": "5"},
        )
    headers = {"Retry-After": "1"} if status == 503 else None
    return error_response(status, str(exc), headers=headers)


def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.errors, exc.headers)


def _http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail or HTTPStatus(exc.status_code).phrase
    return error_response(exc.status_code, detail, headers=exc.headers)


Handler = Callable[[Request, Exception], Response | Awaitable[Response]]

EXCEPTION_HANDLERS: dict[type[Exception] | int, Handler] = {
    ApiError: _api_error,
    HTTPException: _http_exception,
    **{error: _domain_error for error in STATUSES},
}
