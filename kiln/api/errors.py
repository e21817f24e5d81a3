"""Service exceptions and request validation errors as HTTP answers.

422 bodies keep FastAPI's (and the seed's) shape: ``{"detail": [{"loc", "msg",
"type"}]}``; every other error is ``{"detail": "<message>"}``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from kiln.schemas.errors import ValidationError
from kiln.services.errors import (
    CapacityExhausted,
    Conflict,
    Forbidden,
    GuestRefused,
    GuestTimedOut,
    GuestUnavailable,
    ImageNotBuilt,
    InvalidRequest,
    NotFound,
    OutOfSpace,
    PolicyRefused,
    QuotaExceeded,
    ServiceError,
    TooLarge,
    Unauthenticated,
    Unsupported,
    UpstreamFailed,
    VmStartFailed,
    WaitTimedOut,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    NotFound: status.HTTP_404_NOT_FOUND,
    Conflict: status.HTTP_409_CONFLICT,
    Forbidden: status.HTTP_403_FORBIDDEN,
    Unauthenticated: status.HTTP_401_UNAUTHORIZED,
    CapacityExhausted: status.HTTP_503_SERVICE_UNAVAILABLE,
    QuotaExceeded: status.HTTP_429_TOO_MANY_REQUESTS,
    ImageNotBuilt: status.HTTP_503_SERVICE_UNAVAILABLE,
    # The VM is recorded as failed; 503 says "the host could not give you one",
    # which is what a client retrying later needs to know (500 would blame Kiln's code).
    VmStartFailed: status.HTTP_503_SERVICE_UNAVAILABLE,
    GuestUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    GuestRefused: status.HTTP_400_BAD_REQUEST,
    TooLarge: status.HTTP_413_CONTENT_TOO_LARGE,
    GuestTimedOut: status.HTTP_504_GATEWAY_TIMEOUT,
    OutOfSpace: status.HTTP_507_INSUFFICIENT_STORAGE,
    Unsupported: status.HTTP_400_BAD_REQUEST,
    WaitTimedOut: status.HTTP_408_REQUEST_TIMEOUT,
    PolicyRefused: status.HTTP_403_FORBIDDEN,
    UpstreamFailed: status.HTTP_502_BAD_GATEWAY,
}

# RFC 6750: a 401 names the scheme the client should use.
AUTHENTICATE_HEADERS = {"WWW-Authenticate": "Bearer"}


def validation_error(*, loc: Iterable[str | int], msg: str) -> RequestValidationError:
    """A 422 raised by a router for input it parses itself (e.g. a JSON query value)."""
    return RequestValidationError([{"loc": tuple(loc), "msg": msg, "type": "value_error"}])


def _validation_body(errors: Iterable[dict[str, Any]]) -> dict[str, Any]:
    detail = [
        ValidationError(loc=list(error["loc"]), msg=_message(error), type=error["type"]).model_dump()
        for error in errors
    ]
    return {"detail": detail}


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        # pydantic's "Extra inputs are not permitted" does not say which, nor why.
        return f"unknown field {error['loc'][-1]!r}: this server does not act on it, so it is refused, not ignored"
    return str(error["msg"])


async def _request_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return JSONResponse(_validation_body(error.errors()), status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _invalid_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, InvalidRequest)
    # Service problems are located inside the request body.
    body = _validation_body(
        {"loc": ("body", *problem.loc), "msg": problem.msg, "type": "value_error"}
        for problem in error.problems
    )
    return JSONResponse(body, status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _service_error(request: Request, error: Exception) -> JSONResponse:
    code = next(
        (code for kind, code in STATUS_BY_ERROR.items() if isinstance(error, kind)),
        status.HTTP_400_BAD_REQUEST,
    )
    headers = AUTHENTICATE_HEADERS if code == status.HTTP_401_UNAUTHORIZED else None
    return JSONResponse({"detail": str(error)}, code, headers=headers)


def disk_is_full(error: BaseException) -> bool:
    """True for a failure that is the data disk being full (SQLite says so in
    words; file writes with ENOSPC), anywhere in the error's chain."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, OperationalError) and "disk is full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _storage_error(request: Request, error: Exception) -> JSONResponse:
    if not disk_is_full(error):
        raise error
    log.error("a request failed because Kiln's data disk is full: %s %s", request.method, request.url.path)
    return JSONResponse(
        {"detail": "the server's data disk is full; nothing was changed. Free space on the host and retry"},
        status.HTTP_507_INSUFFICIENT_STORAGE,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(InvalidRequest, _invalid_request)
    app.add_exception_handler(ServiceError, _service_error)
    # A full data disk is the host's state, not a bug of the request: 507, never 500.
    app.add_exception_handler(OperationalError, _storage_error)
    app.add_exception_handler(OSError, _storage_error)
