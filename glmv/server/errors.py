"""Exception handlers: every error the server answers is OpenAI-shaped JSON.

`{"error": {"message", "type", "param", "code"}}` with the status of the `glmv.errors` class;
FastAPI's 422 validation errors become 400 `invalid_request_error` with `param` set; unknown
routes are 404 and wrong methods 405 in the same shape; anything unexpected is a 500 whose body
says nothing about the code (the traceback goes to the server log only). Rate-limit and overload
errors carry `Retry-After`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmv.errors import GlmvError, OverloadedError, RateLimitError
from glmv.server.protocol import validation_error_to_glmv

log = logging.getLogger("glmv.server")

_HTTP_CODES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    406: ("invalid_request_error", "not_acceptable"),
    408: ("timeout_error", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("overloaded_error", "overloaded"),
}


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def retry_after_headers(exc: GlmvError) -> dict[str, str]:
    if isinstance(exc, (RateLimitError, OverloadedError)):
        return {"Retry-After": str(max(1, math.ceil(float(exc.retry_after))))}
    return {}


class _ErrorJSONResponse(JSONResponse):
    """JSON that can always be written: text without a UTF-8 form (a lone surrogate echoed from
    the request) is sent as a `\\u` escape instead of failing the response."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def glmv_error_response(exc: GlmvError) -> JSONResponse:
    return _ErrorJSONResponse(exc.to_dict(), status_code=exc.status_code, headers=retry_after_headers(exc))


async def _glmv_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GlmvError)
    if exc.status_code >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
    return glmv_error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = validation_error_to_glmv(list(exc.errors()))
    content_type = request.headers.get("content-type", "")
    if error.code == "invalid_request_body" and "json" not in content_type.lower():
        error.message += " Send it with the header 'Content-Type: application/json'."
    return glmv_error_response(error)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    error_type, code = _HTTP_CODES.get(
        status, ("invalid_request_error" if status < 500 else "internal_error", None)
    )
    if status == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
    headers = dict(exc.headers) if exc.headers else None
    return _ErrorJSONResponse(error_body(message, error_type, code=code), status_code=status, headers=headers)


def internal_error_response() -> JSONResponse:
    """The 500 for an unexpected error: it says nothing about the code (the log has the traceback)."""
    return JSONResponse(
        error_body(
            "The server had an error while processing your request.", "internal_error", code="internal_error"
        ),
        status_code=500,
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error_response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GlmvError, _glmv_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
