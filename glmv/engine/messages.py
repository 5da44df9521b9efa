"""The small typed messages between the front end and an engine core (msgspec structs).

Core → front end: `CoreOutput` (per request and step: token ids, logprob ids/values, finish reasons,
counts) inside `CoreOutputs` (one batch per core loop iteration, with the core's stats); `Ready` /
`StartFailed` once at start-up. Front end → core: `AddRequest`, `Abort`, `StopSeqs`, `Shutdown`.
The in-process engine uses `CoreOutput` too, so both modes share the front end's output processing.

Images never travel in these messages: `AddRequest.images` describes where each image's array
lies in one shared-memory segment of the request (`glmv.engine.shm`). Errors cross as `ErrorInfo`
and are rebuilt as the same `GlmvError` class on the other side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from glmv import errors as _errors
from glmv.engine.sampling import SamplingParams
from glmv.engine.stats import EngineStats
from glmv.errors import EngineError, GlmvError

# --- errors ----------------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct, array_like=True, omit_defaults=True):
    kind: str  # the GlmvError subclass name
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None


def error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, GlmvError):
        return ErrorInfo(
            type(exc).__name__, exc.message, exc.param, exc.code, getattr(exc, "retry_after", None)
        )
    return ErrorInfo("EngineError", f"{type(exc).__name__}: {exc}")


def _error_classes() -> dict[str, type[GlmvError]]:
    found: dict[str, type[GlmvError]] = {}
    todo: list[type[GlmvError]] = [GlmvError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def to_error(info: ErrorInfo) -> GlmvError:
    """The exception `info` describes, as its own class (an unknown class becomes `EngineError`)."""
    cls = getattr(_errors, info.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, GlmvError)):
        cls = _error_classes().get(info.kind, EngineError)
    exc = cls.__new__(cls)
    GlmvError.__init__(exc, info.message, param=info.param, code=info.code)
    if info.retry_after is not None:
        exc.retry_after = info.retry_after  # type: ignore[attr-defined]
    return exc


# --- core → front end ------------------------------------------------------------------------------


class SeqOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one choice since the previous output (with logprobs when asked for)."""

    index: int
    token_ids: list[int]
    logprobs: list[float] | None = None  # of each sampled token
    top_ids: list[list[int]] | None = None  # alternatives of each sampled token, best first
    top_logprobs: list[list[float]] | None = None
    finish_reason: str | None = None  # "stop" (eos / stop token) | "length" | "abort" | "error"
    stop_reason: int | str | None = None


class CoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    seqs: list[SeqOutput]
    prompt_tokens: int
    cached_tokens: int
    finished: bool
    error: ErrorInfo | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


class AddFailed(msgspec.Struct, array_like=True):
    request_id: str
    error: ErrorInfo


class CoreOutputs(msgspec.Struct, tag=True, array_like=True):
    outputs: list[CoreOutput]
    stats: EngineStats
    consumed: list[str] = []  # requests whose shared-memory images the core has copied
    failed: list[AddFailed] = []  # requests the core refused when they arrived


class Ready(msgspec.Struct, tag=True, array_like=True):
    info: dict[str, Any]  # EngineInfo's fields
    stats: EngineStats


class StartFailed(msgspec.Struct, tag=True, array_like=True):
    error: ErrorInfo
    traceback: str


FromCore = CoreOutputs | Ready | StartFailed


# --- front end → core ------------------------------------------------------------------------------


class ImageMeta(msgspec.Struct, array_like=True):
    """One image of an `AddRequest`: its placeholder span and where its array lies in the segment."""

    offset: int
    length: int
    content_hash: str
    grid_thw: tuple[int, int, int]
    kind: str  # "pixels" (uint8 H×W×3) | "values" (float rows)
    dtype: str  # numpy dtype name, or "bfloat16" (sent as int16 bits)
    shape: list[int]
    start: int  # byte offset in the segment
    nbytes: int


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    images: list[ImageMeta] = []
    shm_name: str | None = None


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class StopSeqs(msgspec.Struct, tag=True, array_like=True):
    seqs: list[tuple[str, int]]  # (request id, choice index) whose text hit a stop string


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


ToCore = AddRequest | Abort | StopSeqs | Shutdown


def _encode_other(value: Any) -> Any:
    if isinstance(value, Mapping):  # e.g. a read-only JSON schema
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise NotImplementedError(f"cannot send a {type(value).__name__} to the engine core")


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder(enc_hook=_encode_other)


def core_decoder() -> msgspec.msgpack.Decoder[Any]:
    """Decodes what the front end sends to a core."""
    return msgspec.msgpack.Decoder(ToCore)


def client_decoder() -> msgspec.msgpack.Decoder[Any]:
    """Decodes what a core sends to the front end."""
    return msgspec.msgpack.Decoder(FromCore)
