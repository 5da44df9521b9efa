"""Checks of a command's inputs, made before any model loads.

Loading a checkpoint takes seconds to minutes; a typo should not. Each check raises a
`UsageError` whose message says what is wrong and what to do: a `--model` that is not a
checkpoint directory (a model hub id gets how to download it), an image file that is missing or
is not an image, a port that is taken, an output folder that already holds files.
"""

from __future__ import annotations

import errno
import re
import socket
from pathlib import Path

from glmv.cli.errors import UsageError

__all__ = [
    "check_image_file",
    "check_model_dir",
    "check_output_dir",
    "check_port_free",
    "clear_weights",
    "looks_like_hub_id",
]

# `owner/name` as model hubs spell it (Hugging Face, ModelScope).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(value: str) -> bool:
    """`value` reads as a model hub id (`THUDM/GLM-4.1V-9B-Thinking`) rather than a path: the
    form `owner/name`, and no folder `owner` here."""
    return bool(_HUB_ID.match(value)) and not Path(value.split("/", 1)[0]).exists()


def check_model_dir(value: str | Path, flag: str = "--model") -> Path:
    """The checkpoint directory `value`, or a `UsageError` saying why it is not one."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{flag} {text}: this folder has no config.json, so it is not a checkpoint; pass the "
                "folder a model was downloaded to (config.json, tokenizer files, *.safetensors)"
            )
        return path
    if path.exists():
        raise UsageError(
            f"{flag} {text} is a file; pass the checkpoint directory that holds it "
            "(config.json, tokenizer files, *.safetensors)"
        )
    if looks_like_hub_id(text):
        name = text.split("/", 1)[1]
        raise UsageError(
            f"{flag} {text} is not a local directory, and glmv does not download from model hubs: "
            f"download it first (`hf download {text} --local-dir models/{name}`; see 'Real models' "
            f"in README.md), then pass {flag} models/{name}"
        )
    raise UsageError(f"{flag} {text} does not exist; pass a checkpoint directory")


def check_image_file(path: Path, flag: str = "--image") -> Path:
    """`path` if it is a file that Pillow recognises as an image (the header is read, not the
    pixels), else a `UsageError`."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise UsageError(f"{flag} {path} does not exist; check the path")
    if not path.is_file():
        raise UsageError(f"{flag} {path} is not a file; pass an image file (PNG, JPEG, WebP, ...)")
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.DecompressionBombError as exc:
        raise UsageError(
            f"{flag} {path} is too large to decode safely ({exc}); pass a smaller image"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = "not an image format Pillow reads" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise UsageError(
            f"{flag} {path} is not a readable image ({reason}); pass a PNG, JPEG, WebP, GIF, BMP or TIFF file"
        ) from None
    return path


def check_port_free(host: str, port: int) -> None:
    """Bind `host:port` the way uvicorn will (SO_REUSEADDR) and let go again: a port that is
    taken, privileged or on an address this machine does not have is a `UsageError` now rather
    than after the model has loaded. Port 0 (any free port) always binds."""
    if port == 0:
        return
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except socket.gaierror as exc:
            raise UsageError(
                f"--host {host} is not a known address ({exc.strerror}); pass --host 127.0.0.1 (this "
                "machine only) or 0.0.0.0 (every interface)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"port {port} on {host} is already in use (another glmv serve?); stop what "
                    "listens there or pass --port with a free port"
                ) from None
            if exc.errno == errno.EACCES:
                raise UsageError(
                    f"no permission to listen on port {port} (ports below 1024 need privileges); "
                    "pass --port 8000 or another port above 1023"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(
                    f"--host {host} is not an address of this machine; pass --host 127.0.0.1 "
                    "(this machine only) or 0.0.0.0 (every interface)"
                ) from None
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def check_output_dir(path: Path, *, force: bool, what: str = "output folder") -> None:
    """`path` may be written: it does not exist, is empty, or `force` is set."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} exists and is a file; choose a folder")
    if path.is_dir() and not force and any(path.iterdir()):
        raise UsageError(
            f"{what} {path} already holds files; pass --force to write over them, or choose an "
            "empty or new folder"
        )


def clear_weights(path: Path) -> list[Path]:
    """Remove the weight files of an earlier checkpoint from `path` (`*.safetensors` and the
    index), so that a checkpoint written over it cannot mix old weights with new ones. Other
    files are left (those of the new checkpoint replace theirs by name)."""
    removed = []
    if path.is_dir():
        for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json")):
            if file.is_file():
                file.unlink()
                removed.append(file)
    return removed
