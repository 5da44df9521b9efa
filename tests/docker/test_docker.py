"""The deployment files in docker/, checked without Docker (images cannot be pulled here).

- `docker/compose.yaml` against the Compose specification's JSON Schema (vendored:
  `tests/docker/compose_spec.json`, see `tests/docker/README.md`), and its wiring (Open WebUI
  points at glmv, glmv's rate limits live in Redis, nginx is the trusted proxy).
- `docker/nginx/nginx.conf` with `nginx -t` (Debian's nginx; `make system-deps` installs it),
  with and without the TLS server blocks of `tls.conf.example`.
- `docker/Dockerfile`: the instructions the image promises (CUDA runtime base, non-root user,
  health check on /ready, /models volume, port 6006, install through `docker/install.sh`).
- `docker/install.sh`, the image's install steps, run here into a fresh venv (without torch
  and without the network: the venv sees this interpreter's packages).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SCHEMA = Path(__file__).resolve().parent / "compose_spec.json"


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


# --- compose ----------------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    assert compose_errors(compose()) == []


def test_the_schema_check_catches_mistakes() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["glmv"]["healthcheck"] = {"test": ["CMD", "true"], "intervall": "10s"}
    broken["services"]["redis"]["ports"] = [{"published": "6379", "target": "not-a-port"}]
    broken["services"]["nginx"]["depends_on"] = {"glmv": {"condition": "when_ready"}}
    errors = compose_errors(broken)
    assert any("intervall" in e for e in errors), errors
    assert any("not-a-port" in e for e in errors), errors
    assert any("when_ready" in e for e in errors), errors


def test_compose_wiring() -> None:
    services = compose()["services"]
    assert set(services) == {"glmv", "open-webui", "nginx", "redis"}
    glmv, webui, nginx = services["glmv"], services["open-webui"], services["nginx"]

    # glmv: built from docker/Dockerfile, models mounted read-only, GPU reserved, no published port.
    assert glmv["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert any(v.endswith(":/models:ro") for v in glmv["volumes"])
    assert glmv["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "ports" not in glmv and glmv["expose"] == ["6006"]
    args = glmv["command"]
    assert args[args.index("--rate-limit-storage") + 1] == "redis://redis:6379/0"
    assert glmv["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "GLMV_API_KEY" in glmv["environment"]

    # Open WebUI: pre-configured to glmv with the same key, Ollama off.
    env = webui["environment"]
    assert env["OPENAI_API_BASE_URL"] == "http://glmv:6006/v1"
    assert env["OPENAI_API_KEY"] == glmv["environment"]["GLMV_API_KEY"]
    assert env["ENABLE_OLLAMA_API"] == "false"
    assert webui["depends_on"]["glmv"]["condition"] == "service_healthy"

    # nginx is the only way in, and the proxy glmv believes X-Forwarded-For from.
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published == nginx["ports"]
    trusted = ipaddress.ip_network(args[args.index("--trusted-proxy") + 1])
    subnet = ipaddress.ip_network(compose()["networks"]["glmv"]["ipam"]["config"][0]["subnet"])
    assert trusted == subnet
    assert ipaddress.ip_address(nginx["networks"]["glmv"]["ipv4_address"]) in subnet
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nginx["volumes"] if not v.startswith("$")}
    assert mounts["/etc/nginx/nginx.conf"] == "./nginx/nginx.conf"
    assert (DOCKER / "nginx" / "nginx.conf").is_file() and (DOCKER / "nginx" / "glmv.d").is_dir()


def test_every_compose_variable_has_a_default_or_an_example() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    example = dict(
        line.split("=", 1)
        for line in (DOCKER / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for match in re.finditer(r"\$\{([A-Z_]+)(:?[-?][^}]*)?\}", text):
        name, tail = match.group(1), match.group(2) or ""
        assert tail.startswith((":-", "-")) or name in example, (
            f"${{{name}}} has no default and is not in env.example"
        )


# --- nginx ------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if path is None:
        pytest.skip("needs Debian's nginx (apt-get install nginx; `make test` installs it)")
    return path


def nginx_t(tmp_path: Path, tls: bool) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on docker/nginx/nginx.conf with the mounted folders pointed at `tmp_path`."""
    conf_dir = tmp_path / "glmv.d"
    conf_dir.mkdir()
    certs = tmp_path / "certs"
    certs.mkdir()
    conf = (DOCKER / "nginx" / "nginx.conf").read_text().replace("/etc/nginx/glmv.d", str(conf_dir))
    conf = conf.replace("/var/log/nginx/", f"{tmp_path}/")
    if tls:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-keyout",
                str(certs / "privkey.pem"),
                "-out",
                str(certs / "fullchain.pem"),
            ],
            check=True,
            capture_output=True,
        )
        tls_conf = (DOCKER / "nginx" / "tls.conf.example").read_text().replace("/etc/nginx/certs", str(certs))
        (conf_dir / "tls.conf").write_text(tls_conf)
    (tmp_path / "nginx.conf").write_text(conf)
    return subprocess.run(
        [
            nginx_binary(),
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-g",
            f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_nginx_config_passes_nginx_t(tmp_path: Path, tls: bool) -> None:
    if tls and shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a test certificate")
    result = nginx_t(tmp_path, tls)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_t_rejects_a_broken_config(tmp_path: Path) -> None:
    nginx_binary()
    (tmp_path / "glmv.d").mkdir()
    (tmp_path / "glmv.d" / "bad.conf").write_text("server { listen 6006; limit_req zone=nope; }\n")
    conf = (
        (DOCKER / "nginx" / "nginx.conf").read_text().replace("/etc/nginx/glmv.d", str(tmp_path / "glmv.d"))
    )
    (tmp_path / "nginx.conf").write_text(conf.replace("/var/log/nginx/", f"{tmp_path}/"))
    result = subprocess.run(
        [
            nginx_binary(),
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-g",
            f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "nope" in result.stderr


def test_nginx_limits_match_glmv() -> None:
    from glmv.server.guard import GuardSettings

    conf = (DOCKER / "nginx" / "nginx.conf").read_text()
    api = conf[conf.index("listen 6006;") : conf.index("listen 80;")]
    assert "limit_req zone=glmv_api" in api and "limit_conn glmv_conn" in api
    assert "proxy_buffering off;" in api  # streamed answers
    cap = re.search(r"client_max_body_size (\d+)m;", api)
    assert cap is not None
    # nginx's cap is glmv's default --max-body-mb: neither refuses what the other lets through.
    assert int(cap.group(1)) * 1024 * 1024 == GuardSettings().max_body_bytes
    assert "limit_req_status 429;" in conf


# --- Dockerfile and install script --------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_promises() -> None:
    steps = dockerfile_instructions()
    kinds = [k for k, _ in steps]
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in steps if k == "ARG" and "=" in v}
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    assert any(k == "RUN" and "docker/install.sh" in v for k, v in steps)
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = next(v for k, v in steps if k == "HEALTHCHECK")
    assert "http://127.0.0.1:6006/ready" in health
    assert next(v for k, v in steps if k == "EXPOSE") == "6006"
    assert json.loads(next(v for k, v in steps if k == "VOLUME")) == ["/models"]
    entry = json.loads(next(v for k, v in steps if k == "ENTRYPOINT"))
    assert entry[:2] == ["glmv", "serve"] and entry[entry.index("--port") + 1] == "6006"
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    # The user is created before it is switched to, and every COPY source exists.
    assert kinds.index("USER") > next(i for i, (k, v) in enumerate(steps) if k == "RUN" and "useradd" in v)
    for kind, value in steps:
        if kind == "COPY":
            for source in value.split()[:-1]:
                assert (REPO / source).exists(), source


@pytest.mark.slow
def test_install_script_installs_glmv_into_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLMV_", "PIP_"))}
    # The new venv sees this interpreter's packages (torch, fastapi, ...) through PYTHONPATH and
    # installs only glmv, from the checkout, offline.
    env.update(
        PYTHON=sys.executable,
        GLMV_VENV=str(venv),
        GLMV_SKIP_TORCH="1",
        GLMV_UPGRADE_PIP="0",
        GLMV_PIP_ARGS="--no-deps --no-build-isolation --no-index",
        PYTHONPATH=sysconfig.get_paths()["purelib"],
        PIP_NO_INPUT="1",
    )
    result = subprocess.run(
        ["sh", str(DOCKER / "install.sh"), str(REPO)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"installed in {venv}" in result.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import glmv.server.docs_assets as m; print(m.DOCS_DIR)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    # glmv comes from the venv (not the checkout), with its data files: the /docs assets.
    docs_dir = Path(where.stdout.strip())
    assert docs_dir.is_relative_to(venv), where.stdout + where.stderr
    assert (docs_dir / "swagger-ui-bundle.js").is_file() and (docs_dir / "index.html").is_file()
    version = subprocess.run([str(venv / "bin" / "glmv"), "--help"], env=env, capture_output=True, text=True)
    assert version.returncode == 0 and "serve" in version.stdout


def test_install_script_refuses_a_folder_that_is_not_a_checkout(tmp_path: Path) -> None:
    result = subprocess.run(
        ["sh", str(DOCKER / "install.sh"), str(tmp_path)],
        env={**os.environ, "GLMV_VENV": str(tmp_path / "v")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "not a glmv checkout" in result.stderr
    assert not (tmp_path / "v").exists()
