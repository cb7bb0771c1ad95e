"""API keys: a JSON key file that holds only SHA-256 hashes, managed by `mosaic-serve keys ...`.

Keys are 256-bit random tokens, so a plain SHA-256 is the right hash (no password stretching needed: there is
nothing to brute-force). The server compares the hash of the presented key against every stored hash with
`hmac.compare_digest`, without stopping at a match, so timing reveals neither the key nor its position.
Replicas re-read the file when its mtime/size/inode change (checked at most once per `reload_interval_s`), so
`keys add` and `keys revoke` take effect within seconds without a restart. A file that cannot be read fails
closed: every key is rejected until it is fixed.

File shape: {"version": 1, "keys": [{"name", "sha256", "requests_per_minute", "tokens_per_minute",
"created_at"}]}; a null limit means unlimited.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from serving.api.errors import APIError

logger = logging.getLogger(__name__)

KEY_PREFIX = "msk-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILE_VERSION = 1


@dataclass(frozen=True)
class KeyRecord:
    name: str
    sha256: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    created_at: str = ""


# The identity of requests when the server runs without a key file (loopback only, or --insecure-no-auth).
ANONYMOUS = KeyRecord(name="anonymous", sha256="")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def _read(path: Path) -> list[KeyRecord]:
    """The file's records; ValueError naming the file and the entry for anything malformed."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("version") != _FILE_VERSION or not isinstance(data.get("keys"), list):
        raise ValueError(f"{path} is not a version-{_FILE_VERSION} API key file")
    return [_record(path, i, entry) for i, entry in enumerate(data["keys"])]


def _record(path: Path, index: int, entry: object) -> KeyRecord:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: key entry {index} {what}")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    unknown = set(entry) - {f.name for f in dataclasses.fields(KeyRecord)}
    if unknown:
        raise bad(f"has unknown fields {sorted(unknown)}")
    name, digest = entry.get("name"), entry.get("sha256")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise bad("has no valid name")
    if not isinstance(digest, str) or not _HASH_RE.match(digest):
        raise bad(f"({name}) has no valid sha256 (64 lowercase hex digits)")
    for field in ("requests_per_minute", "tokens_per_minute"):
        value = entry.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(f"({name}) has an invalid {field}: expected a positive integer or null")
    if not isinstance(entry.get("created_at", ""), str):
        raise bad(f"({name}) has an invalid created_at")
    return KeyRecord(**entry)


def _write(path: Path, records: list[KeyRecord]) -> None:
    """Replace the file atomically, so a polling server never reads half a file."""
    body = json.dumps({"version": _FILE_VERSION, "keys": [asdict(r) for r in records]}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[list[KeyRecord]]:
    """Serialize read-modify-write cycles of concurrent `keys` commands on the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield _read(path) if path.exists() else []


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"invalid {name}={value!r}: expected a positive integer or none")


def add_key(path: str | Path, name: str, requests_per_minute: int | None = None,
            tokens_per_minute: int | None = None) -> str:
    """Create a key named `name` and return it; only its hash is stored, so this is the one chance to see it."""
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid key name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    _check_limit("requests_per_minute", requests_per_minute)
    _check_limit("tokens_per_minute", tokens_per_minute)
    path = Path(path)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with _locked(path) as records:
        if any(r.name == name for r in records):
            raise ValueError(f"a key named {name!r} already exists in {path}; revoke it first")
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        records.append(KeyRecord(name, hash_key(key), requests_per_minute, tokens_per_minute, created))
        _write(path, records)
    return key


def revoke_key(path: str | Path, name: str) -> None:
    path = Path(path)
    with _locked(path) as records:
        kept = [r for r in records if r.name != name]
        if len(kept) == len(records):
            raise ValueError(f"no key named {name!r} in {path}")
        _write(path, kept)


def list_keys(path: str | Path) -> list[KeyRecord]:
    path = Path(path)
    return _read(path) if path.exists() else []


def parse_authorization(header: str | None) -> str | None:
    """`Authorization: Bearer <key>` or the raw key (the MosaicML style)."""
    if not header:
        return None
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return header


class KeyStore:
    def __init__(self, path: str | Path, reload_interval_s: float = 1.0):
        self.path = Path(path)
        self.reload_interval_s = reload_interval_s
        self._records: list[KeyRecord] = []
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._failing = False
        self._maybe_reload(force=True)

    def _maybe_reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.reload_interval_s:
            return
        self._checked_at = now
        try:
            st = os.stat(self.path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if signature != self._signature:
                self._records = _read(self.path)
                self._signature = signature
                logger.info("loaded %d API keys from %s", len(self._records), self.path)
        except (OSError, ValueError) as exc:
            # Logged once per failure spell (at start-up too), not at every check.
            if self._records or self._signature is not None or not self._failing:
                reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
                logger.error("cannot read API key file %s (%s); rejecting every key until it is fixed",
                             self.path, reason)
            self._records, self._signature, self._failing = [], None, True
        else:
            self._failing = False

    def authenticate(self, authorization: str | None) -> KeyRecord:
        key = parse_authorization(authorization)
        if key is None:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", "missing_api_key")
        self._maybe_reload()
        digest = hash_key(key)
        found: KeyRecord | None = None
        for record in self._records:
            # No early exit: every request compares against every stored hash.
            if hmac.compare_digest(record.sha256, digest):
                found = record
        if found is None:
            raise APIError(401, "invalid or revoked API key", "invalid_api_key")
        return found
