"""Default locations, shared by the daemon and mmctl.

root (a system service): /run/mmd, /var/lib/mmd, /var/log/mmd, /etc/mmd.
a user: $XDG_RUNTIME_DIR/mmd (or /tmp/mmd-$UID), $XDG_STATE_HOME/mmd,
$XDG_CONFIG_HOME/mmd.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SOCKET_ENV = "MMD_SOCKET"
CONFIG_ENV = "MMD_CONFIG"
LLAMA_SERVER_ENV = "MMD_LLAMA_SERVER"
SYSTEM_CONFIG = Path("/etc/mmd/mmd.toml")


def _is_root() -> bool:
    return os.geteuid() == 0


MAX_SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes, the last one a NUL


def socket_path_bytes(path: Path) -> int:
    """The length bind() sees: the absolute path, encoded."""
    return len(os.fsencode(path.absolute()))


def child_socket(runtime: Path, model_id: str) -> Path:
    """Where a model's llama-server listens: ``children/<id>.sock`` under the daemon's
    socket directory, or a name made from the id's hash when that path is too long to
    bind (model ids may have 64 characters)."""
    path = runtime / "children" / f"{model_id}.sock"
    if socket_path_bytes(path) <= MAX_SOCKET_PATH_BYTES:
        return path
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    return runtime / "children" / f"{digest}.sock"


def runtime_dir() -> Path:
    if _is_root():
        return Path("/run/mmd")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "mmd"
    return Path(f"/tmp/mmd-{os.getuid()}")


def default_socket() -> Path:
    """The socket both mmd and mmctl use when neither --socket nor $MMD_SOCKET says."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    return runtime_dir() / "mmd.sock"


def default_state_dir() -> Path:
    if _is_root():
        return Path("/var/lib/mmd")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "mmd"


def default_log_dir() -> Path:
    if _is_root():
        return Path("/var/log/mmd")
    return default_state_dir() / "logs"


def config_candidates() -> list[Path]:
    """Config files in lookup order after --config: $MMD_CONFIG, XDG, /etc."""
    found: list[Path] = []
    env = os.environ.get(CONFIG_ENV)
    if env:
        found.append(Path(env))
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    found.append(base / "mmd" / "mmd.toml")
    found.append(SYSTEM_CONFIG)
    return found
