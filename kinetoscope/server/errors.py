"""Every failure leaves as OpenAI's error envelope, {"error": {message, type, param, code}}, so
OpenAI's clients raise their usual exceptions (BadRequestError, AuthenticationError, ...)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kinetoscope.server.schemas import ErrorBody, ErrorEnvelope

log = logging.getLogger("kinetoscope.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "requests", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type or ERROR_TYPES.get(status, "server_error"), param=param, code=code)
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def not_found(video_id: str) -> ApiError:
    # The same answer whether the video never existed or belongs to another key: no oracle.
    return ApiError(404, f"No video found with id '{video_id}'.", code="video_not_found", param="video_id")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(ErrorEnvelope(error=error.body).model_dump(), status_code=error.status, headers=error.headers)


def describe_validation_error(error: dict) -> tuple[str, str | None]:
    """A pydantic error as (message, param), e.g. ("seconds: Input should be ...", "seconds")."""
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    if error.get("type") == "extra_forbidden":
        return f"Unknown parameter: '{param}'.", param
    return (f"Invalid '{param}': {error.get('msg')}." if param else str(error.get("msg"))), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError):
        message, param = describe_validation_error(error.errors()[0])
        return error_response(bad_request(message, param))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(ApiError(error.status_code, str(error.detail), code=code, headers=error.headers))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "The server had an error while processing your request.", code="server_error"))
