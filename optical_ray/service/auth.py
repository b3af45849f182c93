"""Who may call the service: fail closed, one key per client.

Two ways to hold keys, chosen by the app arg ``auth``:

- ``keys``: a YAML file (``api_keys_file``; on Kubernetes a Secret mounted as a file) mapping each
  client's name to the SHA-256 of its key, never the key itself::

      alice: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
      batch-jobs: {sha256: fcde2b2e..., requests_per_s: 50, burst: 100}   # its own rate limit

  ``optical-ray keys add NAME --file FILE`` makes a key, appends its digest and prints the key once.
  The file is re-read when it changes (checked at most once a second), so adding, revoking and
  rotating a key needs no restart; a file that goes missing, empty or unreadable admits nobody until
  it is mended.
- ``api_key``: one key, held in an environment variable (``OPTICAL_RAY_API_KEY`` unless ``api_key_env``
  names another); its client is called ``default``.

Either way the key is presented as ``X-API-Key: KEY``, ``Authorization: Bearer KEY`` (what OpenAI
clients send) or HTTP Basic auth with KEY as the password (so a browser can open the search page),
compared in constant time and never logged. With no key to check against, the app refuses to start,
unless it says ``auth: none`` on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from starlette.requests import Request

API_KEY_ENV = "OPTICAL_RAY_API_KEY"
OPEN_PATHS = ("/healthz", "/readyz")
MODES = ("keys", "api_key", "none")
RELOAD_EVERY_S = 1.0
DIGEST = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("ray.serve")


class KeyFileError(ValueError):
    """A key file that cannot be used, naming the file and the entry."""


@dataclass(frozen=True)
class Client:
    """A caller the service knows: its name (in logs and metrics) and its own rate limit, if any."""

    name: str
    requests_per_s: float | None = None
    burst: int | None = None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_file(path: str | os.PathLike) -> dict[str, Client]:
    """``{sha256 hex: Client}`` from a key file; :class:`KeyFileError` names what is wrong."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise KeyFileError(f"{path}: cannot read the key file ({err})") from None
    if not entries:
        raise KeyFileError(f"{path}: no keys in the key file")
    if not isinstance(entries, dict):
        raise KeyFileError(f"{path}: expected a mapping of client name to SHA-256 digest, got {type(entries).__name__}")
    clients = {}
    for name, entry in entries.items():
        spec = {"sha256": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, dict) or not DIGEST.fullmatch(str(spec.get("sha256", "")).lower()):
            raise KeyFileError(f"{path}: entry {name!r} needs the key's SHA-256 as 64 hex digits "
                               "(`optical-ray keys add NAME --file FILE` writes one)")
        unknown = set(spec) - {"sha256", "requests_per_s", "burst"}
        if unknown:
            raise KeyFileError(f"{path}: entry {name!r} has unknown field(s) {', '.join(sorted(unknown))}")
        rate, burst = spec.get("requests_per_s"), spec.get("burst")
        if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
            raise KeyFileError(f"{path}: entry {name!r}: requests_per_s must be a number > 0, got {rate!r}")
        if burst is not None and not (isinstance(burst, int) and burst >= 1):
            raise KeyFileError(f"{path}: entry {name!r}: burst must be an integer >= 1, got {burst!r}")
        key_digest = spec["sha256"].lower()
        if key_digest in clients:
            raise KeyFileError(f"{path}: entries {clients[key_digest].name!r} and {name!r} hold the same key")
        clients[key_digest] = Client(str(name), rate, burst)
    return clients


class KeyRing:
    """The clients allowed in: from a key file (re-read when it changes) or one environment variable."""

    def __init__(self, keys_file: str | None = None, api_key_env: str = API_KEY_ENV):
        self.keys_file, self.api_key_env = keys_file, api_key_env
        self._clients: dict[str, Client] = {}
        self._seen: tuple | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if keys_file:
            self._clients = parse_key_file(keys_file)  # at start a bad file is an error: no start
            self._seen = self._stamp()

    def _stamp(self) -> tuple | None:
        try:
            stat = os.stat(self.keys_file)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY_S:
            return
        with self._lock:
            self._checked = now
            stamp = self._stamp()
            if stamp == self._seen:
                return
            self._seen = stamp
            try:
                self._clients = parse_key_file(self.keys_file)
                log.info("key file %s reloaded: %d client(s)", self.keys_file, len(self._clients))
            except KeyFileError as err:
                self._clients = {}  # fail closed: no usable file, nobody in
                log.error("%s; every request is refused until it is mended", err)

    def client(self, presented: str | None) -> Client | None:
        """The client whose key was presented, or None."""
        if not presented:
            return None
        if not self.keys_file:
            expected = os.environ.get(self.api_key_env)
            ok = bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())
            return Client("default") if ok else None
        self._refresh()
        wanted, found = digest(presented), None
        for key_digest, client in self._clients.items():  # every digest compared: no early exit to time
            if hmac.compare_digest(wanted, key_digest):
                found = client
        return found


def _write_entries(path: Path, entries: dict) -> None:
    """Replace the file in one rename, so a service re-reading it never sees half of it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(yaml.safe_dump(entries, sort_keys=False))
    os.chmod(partial, 0o600)
    partial.replace(path)


def _entries(path: Path) -> dict:
    if not path.exists():
        return {}
    if path.read_text().strip():
        parse_key_file(path)  # refuse to edit a file the service would refuse
    return yaml.safe_load(path.read_text()) or {}


def add_key(path: str | os.PathLike, name: str, requests_per_s: float | None = None, burst: int | None = None,
            replace: bool = False) -> str:
    """A new random key for client ``name``: its SHA-256 goes into the key file, the key is returned
    (shown once, stored nowhere). ``replace`` rotates an existing client's key."""
    path = Path(path)
    entries = _entries(path)
    if name in entries and not replace:
        raise KeyFileError(f"{path}: client {name!r} already has a key (rotate it with --replace, or revoke it)")
    key = secrets.token_urlsafe(32)
    limits = {k: v for k, v in (("requests_per_s", requests_per_s), ("burst", burst)) if v is not None}
    entries[name] = {"sha256": digest(key), **limits} if limits else digest(key)
    _write_entries(path, entries)
    parse_key_file(path)
    return key


def revoke_key(path: str | os.PathLike, name: str) -> None:
    path = Path(path)
    entries = _entries(path)
    if name not in entries:
        raise KeyFileError(f"{path}: no client {name!r} (clients: {', '.join(map(str, entries)) or 'none'})")
    del entries[name]
    _write_entries(path, entries)


def check_auth(auth: str, api_key_env: str = API_KEY_ENV, keys_file: str | None = None) -> None:
    """Refuse to start open by accident: a usable key file, a key in ``api_key_env``, or ``auth: none``."""
    if auth not in MODES:
        raise ValueError(f"serve app arg auth must be one of {', '.join(MODES)}, got {auth!r}")
    if auth == "keys":
        if not keys_file:
            raise RuntimeError("refusing to start: auth: keys needs the app arg api_keys_file (a YAML file of "
                               "name: sha256 of the key)")
        try:
            parse_key_file(keys_file)
        except KeyFileError as err:
            raise RuntimeError(f"refusing to start: {err}") from None
    if auth == "api_key" and not os.environ.get(api_key_env):
        raise RuntimeError(f"refusing to start without an API key: set {api_key_env} in the environment of the Ray "
                           "nodes (a Kubernetes Secret on KubeRay), or use auth: keys with a key file, or serve "
                           "without one on purpose with the app arg auth: none")


def presented_key(request: Request) -> str | None:
    if key := request.headers.get("x-api-key"):
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None
