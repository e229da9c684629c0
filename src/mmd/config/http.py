"""``[http]`` settings: where the HTTP front door listens and who may use it.

Pure parsing and checks (no aiohttp here): the config module imports this.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmd.host import paths

# A file of API keys is small; a large one is a mistake (a model file named by accident).
MAX_KEYS_FILE_BYTES = 64 * 1024
MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class Listen:
    """One address: a TCP ``host``/``port``, or a Unix socket ``path``."""

    text: str
    host: str = ""
    port: int = 0
    path: Path | None = None

    @property
    def loopback(self) -> bool:
        """Only this machine can connect: a Unix socket, or a loopback TCP address."""
        if self.path is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


# The statuses a "does not fit" answer may have: 507 says what happened; 503 is one a
# load balancer retries on another node (HAProxy's retry-on accepts 503, not 507).
INSUFFICIENT_MEMORY_STATUSES = (507, 503)


@dataclass(frozen=True)
class HttpSettings:
    listen: tuple[Listen, ...] = ()
    api_keys: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    insufficient_memory_status: int = 507

    @property
    def enabled(self) -> bool:
        return bool(self.listen)


def parse_listen_address(text: str) -> Listen:
    """ "127.0.0.1:8080", "[::1]:8080", "8080" (loopback) or "unix:/run/mmd/http.sock"."""
    if text.startswith("unix:"):
        path = Path(text.removeprefix("unix:")).expanduser()
        if not path.is_absolute():
            raise ValueError(f"a Unix socket path must be absolute, got {text!r}")
        size = paths.socket_path_bytes(path)
        if size > paths.MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"socket path {path} is {size} bytes; a Unix socket path holds at most "
                f"{paths.MAX_SOCKET_PATH_BYTES}"
            )
        return Listen(text=text, path=path)
    try:
        host, port = parse_host_port(text)
    except ValueError:
        raise ValueError(f"expected HOST:PORT, a port number or unix:/PATH, got {text!r}") from None
    return Listen(text=text, host=host, port=port)


def parse_host_port(text: str) -> tuple[str, int]:
    """ "127.0.0.1:9464", "[::1]:9464", "0.0.0.0:9464", or "9464" (loopback) -> (host, port);
    the metrics listener's address too."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT or a port number, got {text!r}")
    return host, int(port_text)


def _listen_list(value: Any) -> tuple[Listen, ...]:
    items = [value] if isinstance(value, str | int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected a list of addresses, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ValueError(f"expected an address string, got {item!r}")
        out.append(parse_listen_address(str(item)))
    return tuple(out)


def _check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key) or not key.isprintable():
        raise ValueError(
            f"{where}: an API key must be at least {MIN_KEY_CHARS} printable characters "
            "without spaces"
        )
    return key


def _key_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(_check_key(k, "api_keys") for k in value)


def _keys_file(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a file path, got {value!r}")
    return Path(value).expanduser()


def _insufficient_memory_status(value: Any) -> int:
    if isinstance(value, bool) or value not in INSUFFICIENT_MEMORY_STATUSES:
        raise ValueError(f"expected 507 or 503, got {value!r}")
    return int(value)


HTTP_KEYS: Mapping[str, Callable[[Any], Any]] = {
    "listen": _listen_list,
    "api_keys": _key_list,
    "api_keys_file": _keys_file,
    "insufficient_memory_status": _insufficient_memory_status,
}


def read_keys_file(path: Path) -> tuple[str, ...]:
    """The keys in ``path``: one a line; blank lines and ``#`` comments skipped."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read: {err.strerror or err}") from None
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_KEYS_FILE_BYTES} bytes; not a file of keys")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_check_key(line, f"{path}:{number}"))
    if not keys:
        raise ValueError(f"{path}: has no keys")
    if os.stat(path).st_mode & 0o004:
        raise ValueError(f"{path}: is readable by every user; chmod o-r it")
    return tuple(keys)


@dataclass(frozen=True)
class HttpAccess:
    """The keys in force: the config's list and the file's (read at start and reload)."""

    keys: frozenset[str] = field(default_factory=frozenset)

    @property
    def required(self) -> bool:
        return bool(self.keys)


def http_settings(values: dict[str, Any]) -> HttpSettings:
    """Checked ``[http]`` values -> settings; refuses a network address without keys."""
    settings = HttpSettings(**values)
    keys_file = settings.api_keys_file
    if keys_file is not None and not keys_file.is_absolute():
        raise ValueError(f"api_keys_file: must be an absolute path, got {str(keys_file)!r}")
    if not settings.api_keys and keys_file is None:
        for address in settings.listen:
            if not address.loopback:
                raise ValueError(
                    f"listen: {address.text} can be reached from other machines; set "
                    "api_keys or api_keys_file, or listen on a loopback address"
                )
    return settings


def load_access(settings: HttpSettings) -> HttpAccess:
    """The keys to require (ValueError when the keys file is unusable)."""
    keys = set(settings.api_keys)
    if settings.api_keys_file is not None:
        keys.update(read_keys_file(settings.api_keys_file))
    return HttpAccess(frozenset(keys))
