"""`glmv serve` configuration: one `Settings` object from flags, `GLMV_*` variables and a TOML file.

Every field of `Settings` is a command-line flag (`max_num_seqs` -> `--max-num-seqs`), an
environment variable (`GLMV_MAX_NUM_SEQS`) and a key of the optional TOML file given by
`--config` / `GLMV_CONFIG` (`max_num_seqs = 64`, dashes allowed too). A flag beats the
environment, which beats the file, which beats the default. Lists are comma-separated in the
environment and may be repeated on the command line.

The guardrails (API keys, IP allowlist, rate limits, body cap, access log) live in
`glmv.server.guard`; its `GuardSettings` is the `guard` field and it adds its own flags.

The engine's settings are not declared here: every field of `EngineConfig` (but `model`) becomes
a `Settings` field of the same name, type and default, and so a flag, a variable and a TOML key
(`ENGINE_FLAGS` adds help texts and choices). `service_config(model_dir)` builds the one
`ServiceConfig` (with its `EngineConfig`) that the server and its engine are made from.

`glmv serve` itself (loading, serving, draining on SIGTERM) is a command of the command line,
above this layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmv.errors import ConfigError
from glmv.tasks.config import QUANTIZATIONS, EngineConfig, ServiceConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

try:
    from glmv.server import guard as _guard_module
except ImportError:  # the guard module is optional: without it the server runs unguarded
    _guard_module = None  # type: ignore[assignment]

log = logging.getLogger("glmv.server")

ENV_PREFIX = "GLMV_"
MiB = 1024 * 1024


def _meta(
    help: str, kind: str, *, choices: tuple[str, ...] | None = None, metavar: str | None = None
) -> dict[str, Any]:
    return {"help": help, "kind": kind, "choices": choices, "metavar": metavar}


def _opt(
    default: Any, help: str, kind: str, *, choices: tuple[str, ...] | None = None, metavar: str | None = None
) -> Any:
    return field(default=default, metadata=_meta(help, kind, choices=choices, metavar=metavar))


# Help texts (and choices) of the engine's flags; the fields, types and defaults are EngineConfig's.
ENGINE_FLAGS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "dtype": ("weight and activation dtype", ("auto", "float32", "bfloat16", "float16")),
    "device": ("torch device, e.g. cuda:0 or cpu (default: cuda if available)", None),
    "max_num_seqs": ("most sequences in one running batch", None),
    "max_num_batched_tokens": ("most tokens in one engine step (chunked prefill splits longer prompts)", None),
    "max_model_len": ("context length cap in tokens (default: the model's)", None),
    "max_waiting": ("queue bound: sequences that may wait; beyond it requests get 503", None),
    "kv_cache_gb": ("KV-cache size in GB (default: 0.5 on CPU, a share of free GPU memory)", None),
    "gpu_memory_utilization": ("share of GPU memory glmv may use", None),
    "gpu_memory_gb": ("cap on the GPU memory glmv uses in all, in GB (e.g. 24 for a 24 GB card)", None),
    "enable_cuda_graphs": ("capture CUDA graphs for decode steps (GPU only)", None),
    "block_size": ("tokens per KV-cache block", None),
    "enable_prefix_caching": ("reuse the KV cache of shared prompt prefixes (and images)", None),
    "async_scheduling": (
        "prepare the next engine step on the host while the device runs the current one, with the "
        "same outputs (default: on for CUDA, off on the CPU, where nothing would overlap)",
        None,
    ),
    "encoder_cache_mb": ("memory for cached image embeddings, in MB", None),
    "seed": ("seed of the default random generator", None),
    "quantization": ("'fp8': FP8 weights made at load from a bf16 checkpoint (Ada/Hopper GPUs); FP8 checkpoints need no flag", QUANTIZATIONS),
    "cudnn_attention": (
        "let the vision tower and prefill attention use cuDNN on CUDA (it plans every new shape on "
        "the CPU; off: flash / memory-efficient attention)",
        None,
    ),
    "engine_mode": (
        "where the engine core runs: 'process' (its own process per core) or 'inprocess' (a thread "
        "of the server, for tests and debugging)",
        ("process", "inprocess"),
    ),
    "data_parallel_size": ("engine cores, one per GPU; requests go to the core that holds their prefix", None),
}
# EngineConfig fields that are not `glmv serve` flags.
_NOT_ENGINE_FLAGS = frozenset({"model"})
# Setting kinds of the annotations EngineConfig uses (annotations are strings there).
_KINDS = {
    "str": "str", "str|None": "str?", "int": "int", "int|None": "int?",
    "float": "float", "float|None": "float?", "bool": "bool", "bool|None": "bool?",
}  # fmt: skip


def _engine_fields() -> list[dataclasses.Field[Any]]:
    """The EngineConfig fields that are settings (all but `model` and types a flag cannot hold)."""
    return [
        f
        for f in dataclasses.fields(EngineConfig)
        if f.name not in _NOT_ENGINE_FLAGS and str(f.type).replace(" ", "") in _KINDS
    ]


def _with_engine_fields(cls: type) -> type:
    """Add one field per engine setting to the class body before `dataclass` sees it: its type
    and default are EngineConfig's (declared once, there), its help comes from ENGINE_FLAGS."""
    annotations = cls.__annotations__  # the class body's own (mutable) dict
    for f in _engine_fields():
        if f.name in annotations:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text, choices = ENGINE_FLAGS.get(f.name, (f.metadata.get("help", f"engine setting {f.name}"), None))
        kind = _KINDS[str(f.type).replace(" ", "")]
        annotations[f.name] = f.type
        setattr(cls, f.name, field(default=default, metadata={**_meta(help_text, kind, choices=choices), "engine": True}))
    return cls


@dataclass(slots=True)
@_with_engine_fields
class Settings:
    """Everything `glmv serve` can be told. See the module docstring for where values come from."""

    # model and engine
    model: str | None = _opt(
        None, "checkpoint directory (default: the embedded demo model, glmv-demo)", "str?", metavar="DIR"
    )
    served_model_name: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "name(s) clients use in 'model' (default: the checkpoint folder's name)", "list", metavar="NAME"
        ),
    )
    chat_template: str | None = _opt(
        None, "chat template override: a .jinja file, template text, or glm41v / glm46v", "str?"
    )
    image_workers: int | None = _opt(
        None,
        "processes that decode and resize images (default: half the CPUs, at most 8; 0: a thread of the server)",
        "int?",
    )
    # the engine: one field per EngineConfig field, added by `_with_engine_fields` (see ENGINE_FLAGS)
    # HTTP
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)", "str")
    port: int = _opt(8000, "TCP port", "int")
    request_timeout: float = _opt(
        600.0, "seconds a chat request may take before it fails with 504 (0: no limit)", "float"
    )
    shutdown_timeout: float = _opt(30.0, "seconds running requests get to finish on SIGTERM", "float")
    header_timeout: float = _opt(
        10.0, "seconds a client gets to send complete request headers (idle or partial: closed)", "float"
    )
    body_timeout: float = _opt(
        60.0, "seconds a client gets to send the whole request body after its headers (408)", "float"
    )
    keep_alive_timeout: float = _opt(5.0, "seconds an idle kept-alive connection stays open", "float")
    max_connections: int = _opt(
        2048, "most open HTTP connections; more are answered 503 and closed", "int"
    )
    log_level: str = _opt(
        "info", "log level", "str", choices=("critical", "error", "warning", "info", "debug")
    )
    # --log-content belongs to the guard (it logs request bodies); answers are logged with it
    log_content: bool = field(default=False, metadata={"kind": "derived"})
    # images
    allow_remote_images: bool = _opt(False, "fetch http(s) image URLs (off: only data: URLs)", "bool")
    allow_http_images: bool = _opt(
        False, "with remote images on, also allow plain http (not only https)", "bool"
    )
    remote_image_domains: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "only fetch remote images from these domains and their subdomains", "list", metavar="DOMAIN"
        ),
    )
    remote_image_timeout: float = _opt(30.0, "seconds a remote image fetch may take in total", "float")
    max_images_per_request: int = _opt(
        8, "most images in one request (in its current turn: earlier turns' images are counted apart)", "int"
    )
    max_history_images: int = _opt(
        8,
        "images of earlier turns kept when a client sends the whole conversation again (the most "
        "recent ones; older ones are replaced by a text placeholder)",
        "int",
    )
    max_image_mb: float = _opt(20.0, "largest encoded image, in MB", "float")
    max_image_pixels: int = _opt(40_000_000, "largest image, in pixels (width x height)", "int")
    max_request_pixels: int = _opt(100_000_000, "most pixels of all images of one request together", "int")
    # the settings file itself (read first, so it has no file key of its own)
    config: str | None = _opt(
        None, "TOML file with settings (keys as the flags, without --)", "str?", metavar="FILE"
    )
    # guardrails: filled from the guard module's own flags
    guard: Any = field(default=None, metadata={"kind": "guard"})
    # moderation policy: the TOML file's [moderation] table (glmv.tasks.moderation.ModerationPolicy)
    moderation: Any = field(default=None, metadata={"kind": "table"})

    def __post_init__(self) -> None:
        if self.guard is None and _guard_module is not None:
            self.guard = _guard_module.GuardSettings()  # the guard's defaults: open, access log on

    # --- derived values -------------------------------------------------------------------------

    def image_limits(self) -> Any:
        from glmv.processing.media import ImageLimits

        return ImageLimits(
            max_image_bytes=max(1, int(self.max_image_mb * MiB)),
            max_pixels=self.max_image_pixels,
            max_total_pixels=self.max_request_pixels,
            max_images=self.max_images_per_request,
        )

    def remote_image_policy(self) -> Any:
        from glmv.processing.media import RemoteImagePolicy

        return RemoteImagePolicy(
            enabled=self.allow_remote_images,
            allowed_domains=tuple(self.remote_image_domains) or None,
            allow_http=self.allow_http_images,
            total_timeout=self.remote_image_timeout,
            max_bytes=max(1, int(self.max_image_mb * MiB)),
        )

    def engine_config(self, model_dir: str | Path) -> EngineConfig:
        """The engine's configuration: every engine field of these settings, for `model_dir`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("engine")}
        return EngineConfig(model=str(model_dir), **values)

    def service_config(self, model_dir: str | Path | None = None) -> ServiceConfig:
        """The one configuration the server's service (and its engine) is made from."""
        model = model_dir if model_dir is not None else self.model
        if not model:
            raise ConfigError("no model to serve: pass --model DIR", param="model")
        return ServiceConfig(
            engine=self.engine_config(model),
            chat_template=self.chat_template,
            image_limits=self.image_limits(),
            remote_images=self.remote_image_policy(),
            image_workers=self.image_workers,
        )

    def http_limits(self) -> Any:
        from glmv.server.http_limits import HttpLimits

        return HttpLimits(
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            keep_alive_timeout=self.keep_alive_timeout,
            max_connections=self.max_connections,
        )

    def validate(self) -> None:
        """Raise `ConfigError` for a value out of range (the image settings are checked by media)."""

        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"{_flag(name)} {what}, got {getattr(self, name)!r}", param=name)

        need(0 <= self.port <= 65535, "port", "must be between 0 and 65535")
        need(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        need(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")
        need(self.max_waiting >= 0, "max_waiting", "must be >= 0")
        need(self.kv_cache_gb is None or self.kv_cache_gb > 0, "kv_cache_gb", "must be > 0")
        need(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        need(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "gpu_memory_gb", "must be > 0")
        need(self.block_size >= 1, "block_size", "must be >= 1")
        need(self.encoder_cache_mb >= 0, "encoder_cache_mb", "must be >= 0")
        need(self.data_parallel_size >= 1, "data_parallel_size", "must be >= 1")
        need(self.image_workers is None or self.image_workers >= 0, "image_workers", "must be >= 0")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and f.metadata["kind"].endswith("?")):
                need(False, f.name, f"must be one of {', '.join(choices)}")
        need(self.request_timeout >= 0, "request_timeout", "must be >= 0")
        need(self.shutdown_timeout >= 0, "shutdown_timeout", "must be >= 0")
        need(self.header_timeout > 0, "header_timeout", "must be > 0")
        need(self.body_timeout > 0, "body_timeout", "must be > 0")
        need(self.keep_alive_timeout > 0, "keep_alive_timeout", "must be > 0")
        need(self.max_connections >= 1, "max_connections", "must be >= 1")
        need(self.remote_image_timeout > 0, "remote_image_timeout", "must be > 0")
        need(self.max_image_mb > 0, "max_image_mb", "must be > 0")
        need(self.max_history_images >= 0, "max_history_images", "must be >= 0")
        need(all(n.strip() for n in self.served_model_name), "served_model_name", "must not hold empty names")
        self.image_limits()
        self.remote_image_policy()

    # --- sources ----------------------------------------------------------------------------------

    @classmethod
    def from_sources(
        cls,
        args: argparse.Namespace | Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
    ) -> Settings:
        """Merge flags (`args`, as parsed by a parser given `add_serve_arguments`), environment and
        TOML file; `config_file` overrides where the file is looked for."""
        given = _given(args)
        env = dict(os.environ if environ is None else environ)
        path = config_file or given.get("config") or _env_value(env, "config") or None
        table: dict[str, Any] = {}
        if path:
            table = _read_toml(Path(str(path)))
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            kind = f.metadata.get("kind")
            if kind in ("guard", "derived", "table"):
                continue
            if f.name in given:
                values[f.name] = _convert(f.name, kind, given[f.name], "flag")
            elif (raw := _env_value(env, f.name)) is not None:
                values[f.name] = _convert(f.name, kind, raw, f"${ENV_PREFIX}{f.name.upper()}")
            elif f.name in table:
                values[f.name] = _convert(f.name, kind, table[f.name], f"{path}")
        if path:
            values["config"] = str(path)
        settings = cls(**values)
        settings.guard = _guard_settings(args, env, table)
        settings.log_content = bool(getattr(settings.guard, "log_content", False))
        if "moderation" in table:
            from glmv.tasks.moderation import ModerationPolicy

            settings.moderation = ModerationPolicy.from_table(table["moderation"], str(path))
        _check_unknown_keys(table, path)
        settings.validate()
        return settings


# --- flags ---------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `Settings` field (defaults are applied later, so given flags are known)."""
    group = parser.add_argument_group("serve")
    engine_group = parser.add_argument_group("engine")
    for f in dataclasses.fields(Settings):
        kind = f.metadata.get("kind")
        if kind in ("guard", "derived", "table"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env = f"{ENV_PREFIX}{f.name.upper()}"
        shown = ", ".join(default) if isinstance(default, list) else default
        help_text = (
            f"{f.metadata['help']} [env {env}; default: {shown if shown not in (None, '', []) else '-'}]"
        )
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        metavar = f.metadata.get("metavar") or {"int": "N", "int?": "N", "float": "NUM", "float?": "NUM"}.get(
            kind
        )
        if metavar and not f.metadata.get("choices"):
            kwargs["metavar"] = metavar
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if kind in ("bool", "bool?"):  # an optional one stays unset (None) without its flag
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs.pop("metavar", None)
        elif kind == "list":
            kwargs["action"] = "append"
        (engine_group if f.metadata.get("engine") else group).add_argument(_flag(f.name), **kwargs)
    add_guard = getattr(_guard_module, "add_guard_arguments", None)
    if add_guard is not None:
        add_guard(parser)


def _given(args: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, Any]:
    if args is None:
        return {}
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(Settings)}
    return {k: v for k, v in items.items() if k in names and k != "guard"}


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(f"{ENV_PREFIX}{name.upper()}")
    if raw is None or raw.strip() == "":
        return None
    return raw


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _convert(name: str, kind: str, value: Any, source: str) -> Any:
    """A flag string, environment string or TOML value as the field's type."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{_flag(name)} (from {source}) {what}, got {value!r}", param=name)

    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
        return None
    if base == "str":
        if not isinstance(value, str):
            raise bad("must be a string")
        return value
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("must be true or false")
    if base == "int":
        if isinstance(value, bool):
            raise bad("must be an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip().replace("_", ""))
        except ValueError:
            raise bad("must be an integer") from None
    if base == "float":
        if isinstance(value, bool):
            raise bad("must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("must be a number") from None
    if base == "list":
        items = value if isinstance(value, list) else [value]
        out: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise bad("must be a list of strings")
            out.extend(part.strip() for part in item.split(",") if part.strip())
        return out
    raise AssertionError(f"unknown setting kind {kind!r}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", param="config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}", param="config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", param="config") from None
    # `max-num-seqs` and `max_num_seqs` both work; a [serve] table may hold the keys too.
    flat: dict[str, Any] = {}
    serve = data.pop("serve", None)
    for source in (data, serve if isinstance(serve, dict) else {}):
        for key, value in source.items():
            flat[str(key).replace("-", "_")] = value
    return flat


def _guard_settings(args: Any, env: Mapping[str, str], table: Mapping[str, Any]) -> Any:
    guard_cls = getattr(_guard_module, "GuardSettings", None)
    if guard_cls is None:
        return None
    from_sources = getattr(_guard_module, "guard_settings_from", None)
    if from_sources is None:
        return guard_cls()
    namespace = args if isinstance(args, argparse.Namespace) else argparse.Namespace(**dict(args or {}))
    return from_sources(namespace, env, table)


def _guard_toml_keys() -> set[str]:
    keys: set[str] = {"guard", "max_body_bytes"}
    guard_cls = getattr(_guard_module, "GuardSettings", None)
    if guard_cls is not None and dataclasses.is_dataclass(guard_cls):
        keys |= {f.name for f in dataclasses.fields(guard_cls)}
    for opt in getattr(_guard_module, "_OPTIONS", ()):
        keys |= set(getattr(opt, "toml", ()))
    return keys


def _check_unknown_keys(table: Mapping[str, Any], path: Any) -> None:
    known = {f.name for f in dataclasses.fields(Settings)} | _guard_toml_keys()
    unknown = sorted(k for k in table if k not in known)
    if unknown:
        raise ConfigError(f"config file {path} has unknown setting(s): {', '.join(unknown)}", param="config")


__all__ = ["ENGINE_FLAGS", "Settings", "add_serve_arguments"]
