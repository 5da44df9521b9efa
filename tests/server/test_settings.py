"""`glmv serve` settings: flags, `GLMV_*` variables and the TOML file, in that order of precedence."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from glmv.cli import build_parser
from glmv.cli.serve import run_serve
from glmv.errors import ConfigError
from glmv.server.settings import Settings, add_serve_arguments


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def load(*argv: str, env: dict[str, str] | None = None) -> Settings:
    return Settings.from_sources(parse(*argv), env or {})


def test_defaults_are_safe() -> None:
    s = load()
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.model is None and s.served_model_name == []
    assert s.allow_remote_images is False and s.remote_image_policy().enabled is False
    assert s.enable_prefix_caching is True
    assert s.guard is not None and s.guard.api_keys == [] and s.guard.access_log is True
    assert s.log_content is False


def test_flag_beats_env_beats_toml_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "glmv.toml"
    config.write_text('port = 9000\nmax-num-seqs = 4\nhost = "0.0.0.0"\nrequest_timeout = 12.5\n')
    env = {"GLMV_CONFIG": str(config), "GLMV_PORT": "9100", "GLMV_HOST": "127.0.0.2"}
    s = load("--port", "9200", env=env)
    assert s.port == 9200  # flag
    assert s.host == "127.0.0.2"  # env over TOML
    assert s.max_num_seqs == 4 and s.request_timeout == 12.5  # TOML over default
    assert s.max_num_batched_tokens == 8192  # default
    assert s.config == str(config)
    assert load(env=env).port == 9100
    assert load("--config", str(config)).port == 9000


def test_types_from_each_source(tmp_path: Path) -> None:
    env = {
        "GLMV_SERVED_MODEL_NAME": "glm-4.1v, alias",
        "GLMV_ALLOW_REMOTE_IMAGES": "yes",
        "GLMV_REMOTE_IMAGE_DOMAINS": "example.com,images.example.org",
        "GLMV_KV_CACHE_GB": "1.5",
        "GLMV_MAX_MODEL_LEN": "none",
        "GLMV_SEED": "",
    }
    s = load("--no-enable-prefix-caching", "--max-image-mb", "2", env=env)
    assert s.served_model_name == ["glm-4.1v", "alias"]
    assert s.allow_remote_images is True
    assert s.remote_image_policy().allowed_domains == ("example.com", "images.example.org")
    assert s.kv_cache_gb == 1.5 and s.max_model_len is None and s.seed is None
    assert s.enable_prefix_caching is False
    assert s.image_limits().max_image_bytes == 2 * 1024 * 1024
    s = load("--served-model-name", "a", "--served-model-name", "b,c")
    assert s.served_model_name == ["a", "b", "c"]
    config = tmp_path / "c.toml"
    config.write_text(
        '[serve]\nserved_model_name = ["x", "y"]\nallow_remote_images = true\nmax_image_pixels = 1_000_000\n'
    )
    s = load("--config", str(config))
    assert s.served_model_name == ["x", "y"] and s.allow_remote_images is True
    assert s.image_limits().max_pixels == 1_000_000


def test_guard_settings_come_from_the_same_sources(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text('port = 8001\n[guard]\nrate_limit_rpm = 30\nallow_ip = ["10.0.0.0/8"]\n')
    s = load("--api-key", "sk-1", "--config", str(config), env={"GLMV_LOG_CONTENT": "true"})
    assert s.port == 8001
    assert s.guard.api_keys == ["sk-1"]
    assert s.guard.requests_per_minute == 30
    assert s.guard.allowed_ips == ["10.0.0.0/8"]
    assert s.log_content is True and s.guard.log_content is True


@pytest.mark.parametrize(
    ("argv", "env", "toml", "words"),
    [
        ((), {"GLMV_PORT": "eighty"}, None, "--port (from $GLMV_PORT) must be an integer"),
        (("--port", "70000"), {}, None, "--port must be between 0 and 65535"),
        ((), {"GLMV_ALLOW_REMOTE_IMAGES": "perhaps"}, None, "must be true or false"),
        ((), {}, "max_num_seqz = 3\n", "unknown setting(s): max_num_seqz"),
        ((), {}, "port = [\n", "is not valid TOML"),
        ((), {}, "port = 8000.5\n", "--port (from"),
        (("--max-images-per-request", "-1"), {}, None, "max_images"),
        (("--max-history-images", "-1"), {}, None, "--max-history-images must be >= 0"),
        (("--gpu-memory-utilization", "1.5"), {}, None, "--gpu-memory-utilization must be in (0, 1]"),
    ],
)
def test_bad_values_are_config_errors(
    tmp_path: Path, argv: tuple[str, ...], env: dict[str, str], toml: str | None, words: str
) -> None:
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        argv = (*argv, "--config", str(path))
    with pytest.raises(ConfigError) as info:
        load(*argv, env=env)
    assert words in info.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load("--config", str(tmp_path / "nope.toml"))


def test_cli_wires_serve(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "--port", "0", "--api-key", "k"])
    assert args.func is run_serve
    # A bad setting stops `glmv serve` with status 2 before any model is loaded.
    monkeypatch.setenv("GLMV_MAX_NUM_SEQS", "many")
    assert run_serve(args) == 2
    assert "--max-num-seqs (from $GLMV_MAX_NUM_SEQS) must be an integer" in capsys.readouterr().err


def test_help_lists_every_setting_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for flag, env in (
        ("--max-waiting", "GLMV_MAX_WAITING"),
        ("--allow-remote-images", "GLMV_ALLOW_REMOTE_IMAGES"),
        ("--api-key", "GLMV_API_KEY"),
    ):
        assert flag in text and env in text


def test_engine_flags_are_the_engine_config_fields() -> None:
    import dataclasses

    from glmv.tasks.config import EngineConfig

    engine_fields = [f for f in dataclasses.fields(EngineConfig) if f.name != "model"]
    settings = load()
    for f in engine_fields:  # every engine setting is a flag, with EngineConfig's own default
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        assert getattr(settings, f.name) == default, f.name
    s = load("--engine-mode", "process", "--data-parallel-size", "2", "--max-num-seqs", "7",
             env={"GLMV_KV_CACHE_GB": "0.25"})  # fmt: skip
    config = s.service_config("/ckpt")
    assert config.engine == EngineConfig(
        model="/ckpt", engine_mode="process", data_parallel_size=2, max_num_seqs=7, kv_cache_gb=0.25
    )
    assert config.image_limits == s.image_limits() and config.image_workers is None
    assert load("--image-workers", "0").service_config("/ckpt").image_workers == 0
    with pytest.raises(ConfigError, match="--engine-mode must be one of process, inprocess"):
        load(env={"GLMV_ENGINE_MODE": "threads"})
    with pytest.raises(ConfigError, match="--data-parallel-size must be >= 1"):
        load("--data-parallel-size", "0")
    with pytest.raises(ConfigError, match="no model"):
        load().service_config()


def test_async_scheduling_reaches_the_engine_config() -> None:
    config = load().engine_config("m")
    assert config.async_scheduling is None  # EngineConfig's default: decided by the device
    assert config.uses_async_scheduling("cuda") and not config.uses_async_scheduling("cpu")
    off = load("--no-async-scheduling").engine_config("m")
    assert off.async_scheduling is False and not off.uses_async_scheduling("cuda")
    on = load("--async-scheduling").engine_config("m")
    assert on.async_scheduling is True and on.uses_async_scheduling("cpu")
    assert load(env={"GLMV_ASYNC_SCHEDULING": "false"}).async_scheduling is False
    assert load(env={"GLMV_ASYNC_SCHEDULING": "none"}).async_scheduling is None
    assert load("--async-scheduling", env={"GLMV_ASYNC_SCHEDULING": "0"}).async_scheduling is True


def test_cudnn_attention_is_an_engine_setting_off_by_default() -> None:
    assert load().engine_config("m").cudnn_attention is False
    assert load("--cudnn-attention").engine_config("m").cudnn_attention is True
    assert load(env={"GLMV_CUDNN_ATTENTION": "true"}).cudnn_attention is True
