"""The one exception tree of glmv.

Every error a user can cause or meet is a subclass of `GlmvError`. Each class carries the HTTP
status, the OpenAI error `type` and a stable `code`, so the server maps an exception onto
`{"error": {"message", "type", "param", "code"}}` one-to-one, and the engine, the CLI and the
offline API raise the very same classes.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GlmvError(Exception):
    """Base class. `param` names the offending input (e.g. `messages[2].content[1].image_url`)."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- configuration and checkpoints (start-up time) -------------------------------------------


class ConfigError(GlmvError):
    """A setting, flag or config file is invalid."""

    error_type = "configuration_error"


class CheckpointError(GlmvError):
    """A checkpoint directory cannot be loaded (missing/corrupt file, wrong tensor, wrong model_type)."""

    error_type = "checkpoint_error"


# --- client errors ---------------------------------------------------------------------------


class InvalidRequestError(GlmvError):
    """The request is malformed or asks for something impossible (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"


class InvalidImageError(InvalidRequestError):
    """An image could not be fetched, decoded or accepted."""

    default_code = "invalid_image"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class UnprocessableEntityError(GlmvError):
    status_code = 422
    error_type = "invalid_request_error"
    default_code = "unprocessable_entity"


class AuthenticationError(GlmvError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(GlmvError):
    status_code = 403
    error_type = "permission_error"
    default_code = "forbidden"


class NotFoundError(GlmvError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class RequestTooLargeError(GlmvError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RequestReadTimeoutError(GlmvError):
    """The client did not send its request (headers or body) in time (HTTP 408)."""

    status_code = 408
    error_type = "timeout_error"
    default_code = "request_timeout"


class RateLimitError(GlmvError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


# --- server-side conditions ------------------------------------------------------------------


class EngineError(GlmvError):
    """The engine failed while serving a request (HTTP 500); other requests are unaffected."""

    status_code = 500
    error_type = "internal_error"
    default_code = "engine_error"


class OverloadedError(GlmvError):
    """The waiting queue is full or the server is shutting down (HTTP 503)."""

    status_code = 503
    error_type = "overloaded_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RequestTimeoutError(GlmvError):
    status_code = 504
    error_type = "timeout_error"
    default_code = "timeout"
