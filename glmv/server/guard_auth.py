"""API keys of the HTTP server: the keys file, hashing, and constant-time Bearer-key checks.

Keys are held only as sha256 digests. A key given on the command line (`--api-key`) is hashed at
start-up and named `key-<first 8 hex digits of its sha256>`; a keys file (`--api-keys-file`)
lists named entries that carry the sha256 of the key (never the key itself) and optional per-key
limits:

JSON (a list, or an object with a `keys` list)::

    [{"name": "alice", "key_sha256": "<64 hex>", "requests_per_minute": 60, "tokens_per_minute": 100000}]

TOML::

    [[keys]]
    name = "alice"
    key_sha256 = "<64 hex>"
    requests_per_minute = 60

The digest of a key is `printf %s "$KEY" | sha256sum` or `glmv.server.guard_auth.hash_api_key(KEY)`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmv.errors import ConfigError

try:  # Python 3.11+
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_ENTRY_FIELDS = frozenset({"name", "key_sha256", "requests_per_minute", "tokens_per_minute"})


@dataclass(slots=True, frozen=True)
class ApiKey:
    """One accepted key: its logged name, the sha256 digest of the key, and optional own limits."""

    name: str
    digest: bytes
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def hash_api_key(key: str) -> str:
    """The hex sha256 of a key, as stored in a keys file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def keys_from_flags(keys: Iterable[str]) -> list[ApiKey]:
    """Keys given in plain text (flags, environment): hashed at once and named by a digest prefix."""
    out: list[ApiKey] = []
    for key in keys:
        key = key.strip()
        if not key:
            continue
        hexdigest = hash_api_key(key)
        out.append(ApiKey(name=f"key-{hexdigest[:8]}", digest=bytes.fromhex(hexdigest)))
    return out


def _optional_limit(entry: Mapping[str, Any], field: str, where: str) -> int | None:
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {field} must be a non-negative integer, got {value!r}", param=field)
    return value or None  # 0 means "no limit of its own"


def parse_key_entries(entries: Sequence[Any], where: str) -> list[ApiKey]:
    """Validate the entries of a keys file (`where` names the file in error messages)."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{where}: entry {i}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{at} must be a table/object with name and key_sha256")
        if "key" in entry or "api_key" in entry:
            raise ConfigError(
                f"{at} holds a plain key; store its sha256 as key_sha256 instead "
                '(printf %s "$KEY" | sha256sum)',
                param="key_sha256",
            )
        unknown = set(entry) - _ENTRY_FIELDS
        if unknown:
            raise ConfigError(f"{at} has unknown fields {sorted(unknown)}; allowed: {sorted(_ENTRY_FIELDS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{at} needs a non-empty name", param="name")
        name = name.strip()
        if name in names:
            raise ConfigError(f"{at}: duplicate key name {name!r}", param="name")
        names.add(name)
        digest = entry.get("key_sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise ConfigError(f"{at} ({name}): key_sha256 must be 64 hex digits", param="key_sha256")
        keys.append(
            ApiKey(
                name=name,
                digest=bytes.fromhex(digest),
                requests_per_minute=_optional_limit(entry, "requests_per_minute", at),
                tokens_per_minute=_optional_limit(entry, "tokens_per_minute", at),
            )
        )
    return keys


def load_api_keys_file(path: str | Path) -> list[ApiKey]:
    """Read a JSON or TOML keys file (chosen by suffix; other suffixes try JSON, then TOML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read API keys file {path}: {exc}", param="api_keys_file") from exc
    data: Any
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"API keys file {path} is neither valid JSON nor TOML: {exc}") from exc
    if isinstance(data, Mapping):
        data = data.get("keys", [])
    if not isinstance(data, list):
        raise ConfigError(f"API keys file {path}: expected a list of keys (or a 'keys' list)")
    return parse_key_entries(data, str(path))


class KeyRing:
    """The accepted keys; `match` compares a presented key with every digest in constant time."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def names(self) -> list[str]:
        return [k.name for k in self._keys]

    def match(self, presented: str | bytes) -> ApiKey | None:
        """The key whose digest equals sha256(presented) (str is UTF-8 encoded; pass raw header bytes as bytes)."""
        # Every digest is compared (no early exit) so timing tells nothing about which key, if
        # any, matched; digests have a fixed length so compare_digest never short-cuts on length.
        raw = presented if isinstance(presented, bytes) else presented.encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(raw).digest()
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None
