"""The guardrails of glmv's HTTP server, installed on the FastAPI app with one call.

`install_guards(app, settings)` adds one plain ASGI middleware (no BaseHTTPMiddleware, so
streamed SSE bodies and disconnects pass through untouched) that, for every HTTP request:

1. assigns a request id (an incoming `x-request-id` that is a short token, else `req_<hex>`),
   returned as the `x-request-id` header of every response and kept in `request.state.request_id`;
2. resolves the client address (X-Forwarded-For only from `trusted_proxies`) and applies the IP
   allowlist (403 `permission_error`) to every path;
3. checks the Bearer API key (401 `invalid_api_key`, `WWW-Authenticate: Bearer`) on `/v1/...`
   and, with `protect_metrics`, on `/metrics`; `/health`, `/ready`, `/`, static assets, `/docs`
   and `/openapi.json` stay open. CORS preflights (`OPTIONS` with
   `Access-Control-Request-Method`) skip the key check and the rate limits;
4. refuses bodies over `max_body_bytes` with 413 before the app parses them (a Content-Length
   over the cap at once; chunked bodies while they stream in);
5. applies requests/min and tokens/min limits on `/v1/...` (429 `rate_limit_exceeded` with
   `Retry-After`) and adds the `x-ratelimit-*` headers (see `guard_ratelimit`);
6. writes one JSON access-log line to `glmv.access` when the response (or stream) ends (see
   `guard_log`).

Routes report usage with `record_usage(request, ...)`; it feeds the access log and the token
limit. A stream that fails after its 200 went out reports its error's code with
`record_error(request, code)`; a response the client left before its end (a stream cut short, or
a request answered 499) is logged with `"error": "aborted"`. Errors are `glmv.errors` classes rendered as `exc.to_dict()`. The guard decides the
client address itself, so uvicorn must run with `proxy_headers=False` (its own
X-Forwarded-For rewriting would otherwise trust 127.0.0.1 behind the guard's back).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmv.errors import (
    AuthenticationError,
    ConfigError,
    GlmvError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
)
from glmv.server.body_send import add_tap as add_body_tap
from glmv.server.guard_auth import ApiKey, KeyRing, bearer_token, keys_from_flags, load_api_keys_file
from glmv.server.guard_log import (
    STATE_CLIENT_IP,
    STATE_ERROR,
    STATE_KEY_NAME,
    STATE_REQUEST_ID,
    STATE_USAGE,
    AccessRecord,
    Usage,
    loggable_content,
    write_access_line,
)
from glmv.server.guard_net import ClientAddressResolver, IpAllowlist, parse_networks
from glmv.server.guard_ratelimit import RateLimiter

__all__ = [
    "GuardMiddleware",
    "GuardSettings",
    "add_guard_arguments",
    "guard_settings_from",
    "install_guards",
    "record_error",
    "record_usage",
    "request_id_of",
]

logger = logging.getLogger("glmv.guard")

MIB = 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


# --- settings --------------------------------------------------------------------------------


@dataclass(slots=True)
class GuardSettings:
    """Everything the guard needs; see `add_guard_arguments` for the meaning of each field."""

    api_keys: list[str] = field(default_factory=list, repr=False)  # never printed with the settings
    api_keys_file: str | None = None
    protect_metrics: bool = False
    allowed_ips: list[str] = field(default_factory=list)
    trusted_proxies: list[str] = field(default_factory=list)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    rate_limit_storage: str = "memory://"
    max_body_bytes: int = 32 * MIB
    log_content: bool = False
    access_log: bool = True


@dataclass(slots=True, frozen=True)
class _Option:
    field: str  # GuardSettings field
    dest: str  # argparse dest
    flag: str
    env: str
    toml: tuple[str, ...]  # accepted TOML keys ("-" and "_" are interchangeable)
    kind: str  # "keys" | "cidrs" | "str" | "bool" | "limit" | "mb"


_OPTIONS: tuple[_Option, ...] = (
    _Option("api_keys", "api_keys", "--api-key", "GLMV_API_KEY", ("api_key", "api_keys"), "keys"),
    _Option("api_keys_file", "api_keys_file", "--api-keys-file", "GLMV_API_KEYS_FILE", ("api_keys_file",), "str"),
    _Option("protect_metrics", "protect_metrics", "--protect-metrics", "GLMV_PROTECT_METRICS", ("protect_metrics",), "bool"),
    _Option("allowed_ips", "allowed_ips", "--allow-ip", "GLMV_ALLOW_IP", ("allow_ip", "allowed_ips"), "cidrs"),
    _Option(
        "trusted_proxies", "trusted_proxies", "--trusted-proxy", "GLMV_TRUSTED_PROXY",
        ("trusted_proxy", "trusted_proxies"), "cidrs",
    ),
    _Option(
        "requests_per_minute", "rate_limit_rpm", "--rate-limit-rpm", "GLMV_RATE_LIMIT_RPM",
        ("rate_limit_rpm", "requests_per_minute"), "limit",
    ),
    _Option(
        "tokens_per_minute", "rate_limit_tpm", "--rate-limit-tpm", "GLMV_RATE_LIMIT_TPM",
        ("rate_limit_tpm", "tokens_per_minute"), "limit",
    ),
    _Option(
        "rate_limit_storage", "rate_limit_storage", "--rate-limit-storage", "GLMV_RATE_LIMIT_STORAGE",
        ("rate_limit_storage",), "str",
    ),
    _Option("max_body_bytes", "max_body_mb", "--max-body-mb", "GLMV_MAX_BODY_MB", ("max_body_mb",), "mb"),
    _Option("log_content", "log_content", "--log-content", "GLMV_LOG_CONTENT", ("log_content",), "bool"),
    _Option("access_log", "access_log", "--access-log", "GLMV_ACCESS_LOG", ("access_log",), "bool"),
)


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the guard's flags (each also read from the GLMV_* variable named in its help)."""
    g = parser.add_argument_group("guard (API keys, IP allowlist, rate limits, body cap, access log)")
    g.add_argument(
        "--api-key", dest="api_keys", action="append", default=None, metavar="KEY",
        help="accept this Bearer key on /v1 (repeatable; env GLMV_API_KEY, comma-separated). "
        "No keys and no keys file: /v1 is open",
    )
    g.add_argument(
        "--api-keys-file", dest="api_keys_file", default=None, metavar="PATH",
        help="TOML or JSON list of {name, key_sha256, requests_per_minute?, tokens_per_minute?}; "
        "key_sha256 is the hex sha256 of the key (env GLMV_API_KEYS_FILE)",
    )
    g.add_argument(
        "--protect-metrics", dest="protect_metrics", action=argparse.BooleanOptionalAction, default=None,
        help="require an API key on /metrics too (env GLMV_PROTECT_METRICS; default off)",
    )
    g.add_argument(
        "--allow-ip", dest="allowed_ips", action="append", default=None, metavar="CIDR",
        help="only these addresses/CIDRs (IPv4 or IPv6) may connect; repeatable or comma-separated "
        "(env GLMV_ALLOW_IP; default: everyone)",
    )
    g.add_argument(
        "--trusted-proxy", dest="trusted_proxies", action="append", default=None, metavar="CIDR",
        help="reverse proxies whose X-Forwarded-For is believed (rightmost untrusted hop is the client); "
        "repeatable (env GLMV_TRUSTED_PROXY; default: none, X-Forwarded-For ignored)",
    )
    g.add_argument(
        "--rate-limit-rpm", dest="rate_limit_rpm", type=int, default=None, metavar="N",
        help="requests per minute per API key name (per client IP without keys); 0 = no limit "
        "(env GLMV_RATE_LIMIT_RPM)",
    )
    g.add_argument(
        "--rate-limit-tpm", dest="rate_limit_tpm", type=int, default=None, metavar="N",
        help="prompt+completion tokens per minute per key name (per client IP without keys), charged "
        "when a response ends; a request is admitted while tokens remain (env GLMV_RATE_LIMIT_TPM)",
    )
    g.add_argument(
        "--rate-limit-storage", dest="rate_limit_storage", default=None, metavar="URI",
        help="where rate-limit counters live: memory:// (default) or redis://HOST:PORT/DB to share them "
        "between replicas (env GLMV_RATE_LIMIT_STORAGE)",
    )
    g.add_argument(
        "--max-body-mb", dest="max_body_mb", type=float, default=None, metavar="MB",
        help="refuse request bodies larger than this with 413 before parsing (env GLMV_MAX_BODY_MB; default 32)",
    )
    g.add_argument(
        "--log-content", dest="log_content", action=argparse.BooleanOptionalAction, default=None,
        help="include request bodies (prompts; inline images elided) in the access log "
        "(env GLMV_LOG_CONTENT; default off)",
    )
    g.add_argument(
        "--access-log", dest="access_log", action=argparse.BooleanOptionalAction, default=None,
        help="write one JSON line per request to the glmv.access logger (env GLMV_ACCESS_LOG; default on)",
    )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _as_list(value: Any, opt: _Option, *, split: bool) -> list[str]:
    items: list[Any]
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise ConfigError(f"{opt.flag}: expected a list of strings, got {value!r}", param=opt.field)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{opt.flag}: expected strings, got {item!r}", param=opt.field)
        parts = item.split(",") if split else [item]
        out.extend(p.strip() for p in parts if p.strip())
    return out


def _as_bool(value: Any, opt: _Option) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{opt.flag}: expected true/false, got {value!r}", param=opt.field)


def _as_limit(value: Any, opt: _Option) -> int | None:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError as exc:
            raise ConfigError(f"{opt.flag}: expected an integer, got {value!r}", param=opt.field) from exc
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{opt.flag}: expected a non-negative integer, got {value!r}", param=opt.field)
    return value or None


def _as_body_bytes(value: Any, opt: _Option) -> int:
    try:
        mb = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{opt.flag}: expected a size in MB, got {value!r}", param=opt.field) from exc
    if isinstance(value, bool) or not math.isfinite(mb) or mb <= 0:
        raise ConfigError(f"{opt.flag}: must be a positive number of MB, got {value!r}", param=opt.field)
    return max(1, int(mb * MIB))


def _convert(value: Any, opt: _Option, *, source: str) -> Any:
    if opt.kind == "keys":
        return _as_list(value, opt, split=source != "flag")
    if opt.kind == "cidrs":
        return _as_list(value, opt, split=True)
    if opt.kind == "bool":
        return _as_bool(value, opt)
    if opt.kind == "limit":
        return _as_limit(value, opt)
    if opt.kind == "mb":
        return _as_body_bytes(value, opt)
    if not isinstance(value, str):
        raise ConfigError(f"{opt.flag}: expected a string, got {value!r}", param=opt.field)
    return value


def _toml_lookup(toml: Mapping[str, Any], names: Sequence[str]) -> tuple[bool, Any, str]:
    tables: list[Mapping[str, Any]] = []
    section = toml.get("guard")
    if isinstance(section, Mapping):
        tables.append(section)
    tables.append(toml)
    for table in tables:
        normalised = {str(k).replace("-", "_"): v for k, v in table.items()}
        for name in names:
            if name in normalised:
                return True, normalised[name], name
    return False, None, ""


def guard_settings_from(
    args: argparse.Namespace, env: Mapping[str, str], toml: Mapping[str, Any]
) -> GuardSettings:
    """Settings with precedence: flag > env GLMV_<NAME> > TOML `[guard]` or top-level keys > default.

    Empty environment variables count as unset. TOML also accepts the field names
    (`allowed_ips`, `requests_per_minute`, ...) and `max_body_bytes` (bytes) besides `max_body_mb`.
    """
    settings = GuardSettings()
    for opt in _OPTIONS:
        flag_value = getattr(args, opt.dest, None)
        if flag_value is not None:
            setattr(settings, opt.field, _convert(flag_value, opt, source="flag"))
            continue
        env_value = env.get(opt.env)
        if env_value is not None and env_value.strip():
            setattr(settings, opt.field, _convert(env_value, opt, source="env"))
            continue
        found, toml_value, _ = _toml_lookup(toml, opt.toml)
        if found:
            setattr(settings, opt.field, _convert(toml_value, opt, source="toml"))
            continue
        if opt.field == "max_body_bytes":
            found, toml_value, _ = _toml_lookup(toml, ("max_body_bytes",))
            if found:
                if isinstance(toml_value, bool) or not isinstance(toml_value, int) or toml_value <= 0:
                    raise ConfigError(f"max_body_bytes must be a positive integer, got {toml_value!r}")
                settings.max_body_bytes = toml_value
    return settings


# --- the guard -------------------------------------------------------------------------------


def _is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _is_metrics(path: str) -> bool:
    return path == "/metrics" or path.startswith("/metrics/")


class Guard:
    """The validated, ready-to-use form of `GuardSettings` (keys hashed, networks parsed, storage open)."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        keys: list[ApiKey] = keys_from_flags(settings.api_keys)
        if settings.api_keys_file:
            keys.extend(load_api_keys_file(settings.api_keys_file))
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ConfigError("API key names must be unique (a key given twice?)", param="api_keys")
        self.auth_enabled = bool(keys) or bool(settings.api_keys_file)
        self.keyring = KeyRing(keys)
        self.allowlist = IpAllowlist(parse_networks(settings.allowed_ips, param="allowed_ips"))
        self.resolver = ClientAddressResolver(parse_networks(settings.trusted_proxies, param="trusted_proxies"))
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(settings, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}", param=name)
        if isinstance(settings.max_body_bytes, bool) or not isinstance(settings.max_body_bytes, int) \
                or settings.max_body_bytes <= 0:
            raise ConfigError(f"max_body_bytes must be a positive integer, got {settings.max_body_bytes!r}")
        self.rpm = settings.requests_per_minute or None
        self.tpm = settings.tokens_per_minute or None
        per_key = any(k.requests_per_minute or k.tokens_per_minute for k in keys)
        self.limiter: RateLimiter | None = (
            RateLimiter(settings.rate_limit_storage) if (self.rpm or self.tpm or per_key) else None
        )
        self.max_body_bytes = settings.max_body_bytes

    def needs_key(self, path: str) -> bool:
        return self.auth_enabled and (_is_v1(path) or (self.settings.protect_metrics and _is_metrics(path)))

    def limits_for(self, key: ApiKey | None) -> tuple[int | None, int | None]:
        rpm, tpm = self.rpm, self.tpm
        if key is not None:
            rpm = key.requests_per_minute or rpm
            tpm = key.tokens_per_minute or tpm
        return rpm, tpm

    async def aclose(self) -> None:
        """Release the rate-limit storage (called when the app's lifespan shuts down)."""
        if self.limiter is not None:
            await self.limiter.aclose()

    def describe(self) -> str:
        parts = [
            f"api keys: {', '.join(self.keyring.names) or 'none (open)'}",
            f"allowlist: {', '.join(map(str, self.allowlist.networks)) or 'everyone'}",
            f"trusted proxies: {', '.join(map(str, self.resolver.trusted)) or 'none'}",
            f"rate limits: rpm={self.rpm} tpm={self.tpm} storage={self.settings.rate_limit_storage}",
            f"max body: {self.max_body_bytes} bytes",
        ]
        return "; ".join(parts)


@dataclass(slots=True)
class _Exchange:
    """The guard's view of one request/response in flight."""

    record: AccessRecord
    headers: list[tuple[bytes, bytes]]
    started: bool = False
    completed: bool = False  # the last body message was sent (the client got the whole response)
    body_too_large: bool = False
    identity: str | None = None
    tpm: int | None = None
    capture: list[bytes] | None = None


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "") or ""
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root):] or "/"
    return path


def _headers(scope: Scope) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw_name, raw_value in scope.get("headers") or ():
        out.setdefault(raw_name.decode("latin-1").lower(), []).append(raw_value.decode("latin-1"))
    return out


def _new_request_id(incoming: Sequence[str] | None) -> str:
    if incoming and len(incoming) == 1 and _REQUEST_ID.match(incoming[0]):
        return incoming[0]
    return f"req_{secrets.token_hex(16)}"


def _error_headers(exc: GlmvError) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    if isinstance(exc, AuthenticationError):
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(exc, RateLimitError | OverloadedError):
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    return headers


def _error_code(body: bytes, status: int) -> str:
    """The `code` (else `type`) of an OpenAI-shaped error body, for the access log's `error`;
    a body without one is logged by its status class."""
    if len(body) <= 65536:
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict):
            for key in ("code", "type"):
                if isinstance(error.get(key), str) and error[key]:
                    return str(error[key])
    if status == 499:  # the route's answer to a client that left before it was ready
        return "aborted"
    return "internal_error" if status >= 500 else "http_error"


def _recorded_error(state: MutableMapping[str, Any]) -> str | None:
    value = state.get(STATE_ERROR)
    return value if isinstance(value, str) and value else None


class GuardMiddleware:
    """Plain ASGI middleware applying a `Guard` to every HTTP request (other scopes pass through)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        guard = self.guard
        headers = _headers(scope)
        state: MutableMapping[str, Any] = scope.setdefault("state", {})
        request_id = _new_request_id(headers.get("x-request-id"))
        state[STATE_REQUEST_ID] = request_id
        path = _route_path(scope)
        ex = _Exchange(
            record=AccessRecord(request_id=request_id, method=scope.get("method", ""), path=path),
            headers=[(b"x-request-id", request_id.encode("latin-1"))],
            capture=[] if guard.settings.log_content else None,
        )

        async def emit(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.started = True
                ex.record.status = int(message["status"])
                own = list(message.get("headers") or [])
                present = {bytes(name).lower() for name, _ in own}
                own.extend((k, v) for k, v in ex.headers if k not in present)
                message = {**message, "headers": own}
            elif message["type"] == "http.response.body":
                see_body(message)
            await send(message)

        def see_body(message: Message) -> None:
            chunk = message.get("body", b"")
            if ex.record.bytes_out == 0 and ex.record.error is None and (ex.record.status or 0) >= 400:
                ex.record.error = _error_code(chunk, ex.record.status or 0)
            ex.record.bytes_out += len(chunk)
            if not message.get("more_body", False):
                ex.completed = True

        # A streamed body skips this layer (glmv.server.body_send); its messages are counted here.
        add_body_tap(scope, see_body)

        async def app_send(message: Message) -> None:
            if ex.body_too_large:  # the app answered a body we cut off: answer 413 instead
                if not ex.started:
                    await self._reject(emit, ex, self._too_large())
                return
            await emit(message)

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                ex.record.bytes_in += len(chunk)
                if ex.record.bytes_in > guard.max_body_bytes:
                    if not ex.started:
                        ex.body_too_large = True
                    raise self._too_large()
                if ex.capture is not None and chunk:
                    ex.capture.append(chunk)
            return message

        try:
            error = await self._screen(scope, headers, path, ex, state)
            if error is not None:
                await self._reject(emit, ex, error)
            else:
                await self.app(scope, counted_receive, app_send)
        except Exception as exc:
            if ex.body_too_large:
                if not ex.started:
                    await self._reject(emit, ex, self._too_large())
                return
            if not ex.started:
                rendered = exc if isinstance(exc, GlmvError) else GlmvError("Internal server error")
                try:
                    await self._reject(emit, ex, rendered)
                except Exception:  # the client is gone; the original error matters more
                    ex.record.status = rendered.status_code
            elif ex.record.error is None and not isinstance(exc, (ClientDisconnect, OSError)):
                ex.record.error = _recorded_error(state) or "internal_error"  # failed mid-response
            raise
        except BaseException:
            if not ex.started:
                ex.record.status = 499  # cancelled before a response (client went away)
            raise
        finally:
            await self._finish(scope, ex, state, started_at)

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.guard.aclose()
            await send(message)

        return lifespan_send

    @staticmethod
    def _too_large() -> RequestTooLargeError:
        return RequestTooLargeError("Request body is larger than the server accepts (see --max-body-mb).")

    async def _screen(
        self,
        scope: Scope,
        headers: dict[str, list[str]],
        path: str,
        ex: _Exchange,
        state: MutableMapping[str, Any],
    ) -> GlmvError | None:
        guard = self.guard
        client = scope.get("client")
        peer = client[0] if client else None
        client_ip = guard.resolver.resolve(peer, headers.get("x-forwarded-for", []))
        shown_ip = str(client_ip) if client_ip is not None else peer
        state[STATE_CLIENT_IP] = shown_ip
        ex.record.client_ip = shown_ip
        if not guard.allowlist.allows(client_ip):
            return PermissionDeniedError("Your IP address is not allowed to use this server.")

        preflight = scope.get("method") == "OPTIONS" and "access-control-request-method" in headers
        key: ApiKey | None = None
        if guard.needs_key(path) and not preflight:
            auth = headers.get("authorization")
            token = bearer_token(auth[0] if auth else None)
            if token is None:
                return AuthenticationError(
                    "You didn't provide an API key. Send it in the Authorization header as "
                    "'Authorization: Bearer YOUR_KEY'."
                )
            # headers were decoded as latin-1: hash the bytes as sent, so UTF-8 keys match too
            key = guard.keyring.match(token.encode("latin-1"))
            if key is None:
                return AuthenticationError("Incorrect API key provided.")
            state[STATE_KEY_NAME] = key.name
            ex.record.key_name = key.name

        length = headers.get("content-length")
        if length:
            try:
                declared = int(length[0])
            except ValueError:
                declared = -1
            if declared > guard.max_body_bytes:
                return self._too_large()

        if guard.limiter is not None and _is_v1(path) and not preflight:
            rpm, tpm = guard.limits_for(key)
            if rpm or tpm:
                identity = f"key:{key.name}" if key is not None else f"ip:{shown_ip}"
                who = f"key {key.name!r}" if key is not None else f"client {shown_ip}"
                admission = await guard.limiter.admit(identity, rpm=rpm, tpm=tpm, who=who)
                ex.headers.extend(admission.headers)
                if admission.error is not None:
                    return admission.error
                ex.identity, ex.tpm = identity, tpm
        return None

    async def _reject(self, emit: Send, ex: _Exchange, exc: GlmvError) -> None:
        body = json.dumps(exc.to_dict()).encode("utf-8")
        ex.record.error = exc.code
        await emit(
            {
                "type": "http.response.start",
                "status": exc.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *_error_headers(exc),
                ],
            }
        )
        await emit({"type": "http.response.body", "body": body, "more_body": False})

    async def _finish(
        self, scope: Scope, ex: _Exchange, state: MutableMapping[str, Any], started_at: float
    ) -> None:
        usage = state.get(STATE_USAGE)
        usage = usage if isinstance(usage, Usage) else None
        limiter = self.guard.limiter
        if limiter is not None and ex.identity is not None and ex.tpm and usage is not None:
            with anyio.CancelScope(shield=True):
                await limiter.charge_tokens(ex.identity, tpm=ex.tpm, tokens=usage.total_tokens)
        if not self.guard.settings.access_log:
            return
        route = scope.get("route")
        ex.record.route = getattr(route, "path", None)
        if ex.record.error is None:
            if ex.started and not ex.completed:
                ex.record.error = "aborted"  # the client left before the response ended
            elif not ex.started:  # the client left before any response (e.g. within its body)
                ex.record.status = ex.record.status or 499
                ex.record.error = "aborted"
            else:
                ex.record.error = _recorded_error(state)
        content = loggable_content(b"".join(ex.capture)) if ex.capture is not None else None
        try:
            write_access_line(
                ex.record.to_json(
                    latency_s=time.perf_counter() - started_at,
                    usage=usage,
                    content=content,
                    with_content=ex.capture is not None,
                )
            )
        except Exception:  # a broken log handler must not fail the request
            logger.exception("could not write the access log line")


# --- public helpers --------------------------------------------------------------------------


def install_guards(app: FastAPI, settings: GuardSettings) -> None:
    """Validate `settings` (ConfigError on bad keys file, CIDR, storage URI...) and add the guard middleware.

    The guard is kept on `app.state.guard`. Install it before the app starts; middleware added
    later wraps around the guard (e.g. CORS added afterwards answers preflights itself).
    """
    guard = Guard(settings)
    app.add_middleware(GuardMiddleware, guard=guard)
    app.state.guard = guard
    if settings.protect_metrics and not guard.auth_enabled:
        logger.warning("--protect-metrics has no effect without --api-key or --api-keys-file")
    logger.info("guard: %s", guard.describe())


def _scope_of(request: Request | MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Request is itself a read-only Mapping over its scope, so test for the attribute first.
    scope = getattr(request, "scope", None)
    if isinstance(scope, MutableMapping):
        return scope
    if isinstance(request, MutableMapping):
        return request
    raise TypeError(f"expected a Request or an ASGI scope, got {type(request).__name__}")


def record_usage(
    request: Request | MutableMapping[str, Any],
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    ttft: float | None = None,
) -> None:
    """Report a request's usage (tokens, time to first token in seconds) to the access log and token limit.

    Call it once the counts are final (for streams: before the last chunk is yielded); a later
    call replaces an earlier one. Safe to call when no guard is installed.
    """
    state = _scope_of(request).setdefault("state", {})
    state[STATE_USAGE] = Usage(
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        cached_tokens=int(cached_tokens),
        ttft=None if ttft is None else float(ttft),
    )


def record_error(request: Request | MutableMapping[str, Any], code: str) -> None:
    """Report the error code of a request that failed after its response started (a stream's
    error event), for the access log's `error`. Safe to call when no guard is installed."""
    _scope_of(request).setdefault("state", {})[STATE_ERROR] = str(code)


def request_id_of(request: Request | MutableMapping[str, Any]) -> str | None:
    """The request id the guard assigned (also `request.state.request_id`)."""
    state = _scope_of(request).get("state") or {}
    value = state.get(STATE_REQUEST_ID)
    return value if isinstance(value, str) else None
