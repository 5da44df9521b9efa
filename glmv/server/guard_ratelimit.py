"""Request and token rate limits of the HTTP server, on the `limits` library (memory or Redis storage).

* Requests per minute use a **moving window**: a request is admitted when fewer than `rpm`
  requests were admitted in the last 60 seconds.
* Tokens per minute (prompt + completion) use a **fixed window** of 60 seconds that starts with
  the first charge. Token counts are only known when a response is finished, so tokens are
  **charged after the response** (from the usage the route records) and a request is admitted
  while the current window has at least one token left. One long request can therefore overshoot
  the budget; the overshoot is charged and later requests wait for the window to reset.

The identity is `key:<key name>` when API keys are configured, else `ip:<client address>`.
Storage is chosen by URI: `memory://` (one process) or `redis://host:port/db` (shared by
several replicas; also `rediss://`, `redis+sentinel://`, `redis+cluster://`, `memcached://`).
If the storage fails (e.g. Redis is down) requests are admitted and a warning is logged: the
limits protect fairness, the engine's own queue bound protects the server.

Response headers follow OpenAI: `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`,
`x-ratelimit-reset-requests` (duration until the oldest request in the window expires, e.g.
`12.5s`, `350ms`) and the `-tokens` variants (duration until the token window resets; the
remaining count is the one before this request's own tokens are charged).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItemPerMinute
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from glmv.errors import ConfigError, RateLimitError

logger = logging.getLogger("glmv.guard")

_STORAGE_WARN_INTERVAL_S = 30.0


def async_storage_uri(uri: str) -> tuple[str, dict[str, str]]:
    """Map a user-facing storage URI to the `limits` async URI and its constructor options."""
    uri = uri.strip()
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise ConfigError(f"rate limit storage {uri!r} is not a URI (e.g. memory:// or redis://host:6379/0)")
    options: dict[str, str] = {}
    if not scheme.startswith("async+"):
        uri = "async+" + uri
        scheme = "async+" + scheme
    if scheme.startswith("async+redis") and importlib.util.find_spec("coredis") is None:
        options["implementation"] = "redispy"  # limits defaults to coredis; redis-py is the common client
    return uri, options


def format_duration(seconds: float) -> str:
    """OpenAI-style reset durations: `350ms`, `12.5s`, `1m0s`."""
    seconds = max(0.0, seconds)
    if seconds < 1.0:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60.0:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        return f"{text}s"
    minutes, rest = divmod(seconds, 60.0)
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s"


def retry_after_seconds(seconds: float) -> int:
    """The whole seconds a client should wait (at least 1)."""
    return max(1, math.ceil(seconds - 1e-9))


@dataclass(slots=True)
class Admission:
    """The outcome of admitting one request: headers to add and, if refused, the error."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    error: RateLimitError | None = None


def _header(name: str, value: str | int) -> tuple[bytes, bytes]:
    return name.encode("latin-1"), str(value).encode("latin-1")


class RateLimiter:
    """Per-identity requests/min and tokens/min limits over one `limits` storage."""

    def __init__(self, storage_uri: str = "memory://") -> None:
        uri, options = async_storage_uri(storage_uri)
        try:
            self.storage = storage_from_string(uri, wrap_exceptions=True, **options)
        except ConfigurationError as exc:
            raise ConfigError(
                f"rate limit storage {storage_uri!r}: {exc}", param="rate_limit_storage"
            ) from exc
        except ImportError as exc:  # pragma: no cover - e.g. redis client missing
            raise ConfigError(
                f"rate limit storage {storage_uri!r} needs a client library: {exc}",
                param="rate_limit_storage",
            ) from exc
        self.storage_uri = storage_uri
        self._requests = MovingWindowRateLimiter(self.storage)
        self._tokens = FixedWindowRateLimiter(self.storage)
        self._last_warning = -math.inf

    def _storage_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _STORAGE_WARN_INTERVAL_S:
            self._last_warning = now
            logger.warning("rate limit storage %s failed (%s); admitting requests unlimited", self.storage_uri, exc)

    async def admit(self, identity: str, *, rpm: int | None, tpm: int | None, who: str) -> Admission:
        """Check the token window, then take one request slot; `who` names the identity in messages."""
        out = Admission()
        try:
            if tpm:
                item = RateLimitItemPerMinute(tpm, namespace="glmv-tokens")
                stats = await self._tokens.get_window_stats(item, identity)
                reset_in = stats.reset_time - time.time() if stats.remaining < tpm else 0.0
                tokens_headers = [
                    _header("x-ratelimit-limit-tokens", tpm),
                    _header("x-ratelimit-remaining-tokens", stats.remaining),
                    _header("x-ratelimit-reset-tokens", format_duration(reset_in)),
                ]
                if stats.remaining <= 0:
                    wait = retry_after_seconds(reset_in)
                    out.headers = tokens_headers
                    out.error = RateLimitError(
                        f"Rate limit reached for tokens per minute ({who}): limit {tpm}. "
                        f"Please try again in {wait}s.",
                        retry_after=wait,
                    )
                    return out
            else:
                tokens_headers = []
            if rpm:
                item = RateLimitItemPerMinute(rpm, namespace="glmv-requests")
                admitted = await self._requests.hit(item, identity)
                stats = await self._requests.get_window_stats(item, identity)
                reset_in = stats.reset_time - time.time() if stats.remaining < rpm else 0.0
                out.headers.extend(
                    [
                        _header("x-ratelimit-limit-requests", rpm),
                        _header("x-ratelimit-remaining-requests", max(0, stats.remaining)),
                        _header("x-ratelimit-reset-requests", format_duration(reset_in)),
                    ]
                )
                if not admitted:
                    wait = retry_after_seconds(reset_in)
                    out.error = RateLimitError(
                        f"Rate limit reached for requests per minute ({who}): limit {rpm}. "
                        f"Please try again in {wait}s.",
                        retry_after=wait,
                    )
            out.headers.extend(tokens_headers)
        except Exception as exc:  # storage down: fail open (see module docstring)
            self._storage_failed(exc)
            return Admission()
        return out

    async def charge_tokens(self, identity: str, *, tpm: int | None, tokens: int) -> None:
        """Charge the tokens a finished request used (unconditionally: overshoot is kept)."""
        if not tpm or tokens <= 0:
            return
        try:
            await self._tokens.hit(RateLimitItemPerMinute(tpm, namespace="glmv-tokens"), identity, cost=tokens)
        except Exception as exc:
            self._storage_failed(exc)

    async def aclose(self) -> None:
        """Close the storage's network client (Redis connections), if it has one."""
        bridge = getattr(self.storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        close = getattr(client, "aclose", None) or getattr(client, "close", None)
        if close is None:
            return
        try:
            result = close()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # closing at shutdown must never fail the shutdown
            logger.debug("closing the rate limit storage failed: %s", exc)
