"""Default locations, shared by the daemon and mmctl so that both agree.

root (a system service): /run/mmd, /var/lib/mmd, /var/log/mmd, /etc/mmd.
a user: $XDG_RUNTIME_DIR/mmd (or /tmp/mmd-$UID), $XDG_STATE_HOME/mmd,
$XDG_CONFIG_HOME/mmd.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

SOCKET_ENV = "MMD_SOCKET"
CONFIG_ENV = "MMD_CONFIG"
SYSTEM_CONFIG = Path("/etc/mmd/mmd.toml")
# The system service's socket (systemd/mmd.service), reachable by the group mmd.
SYSTEM_SOCKET = Path("/run/mmd/mmd.sock")


def _is_root() -> bool:
    return os.geteuid() == 0


MAX_SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes, the last one a NUL


def socket_path_bytes(path: Path) -> int:
    """The length bind() sees: the absolute path, encoded."""
    return len(os.fsencode(path.absolute()))


def children_dir(sock: Path) -> Path:
    """The directory of a daemon's children's sockets: ``<socket>.d`` beside its own socket,
    so that two daemons sharing a directory never reach each other's children. (A short
    suffix: every byte of it is one less for the socket path, which holds 107.)"""
    return sock.with_name(sock.name + ".d")


def json_socket(sock: Path) -> Path:
    """The daemon's JSON Lines socket, ``<socket>.json`` beside its gRPC socket: what
    mmctl's quick commands (``ps``, a one-shot ``infer``) use, since a client that must
    import grpc takes several times longer to start than the request takes."""
    return sock.with_name(sock.name + ".json")


def child_socket(children: Path, model_id: str) -> Path:
    """Where a model's llama-server listens: ``<id>.sock`` in the daemon's ``children``
    directory, or a name made from the id's hash when that path is too long to bind
    (model ids may have 64 characters)."""
    path = children / f"{model_id}.sock"
    if socket_path_bytes(path) <= MAX_SOCKET_PATH_BYTES:
        return path
    import hashlib  # here: mmctl's quick commands load this module and never need it

    digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    return children / f"{digest}.sock"


def fallback_runtime_dir() -> Path:
    """A user's runtime directory without $XDG_RUNTIME_DIR. It lies in /tmp, where any user
    can create it first: see check_private_dir."""
    return Path(f"/tmp/mmd-{os.getuid()}")


def runtime_dir() -> Path:
    if _is_root():
        return Path("/run/mmd")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "mmd"
    return fallback_runtime_dir()


def default_socket() -> Path:
    """The socket mmd serves when neither --socket, $MMD_SOCKET nor its config says."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    return runtime_dir() / "mmd.sock"


def socket_candidates() -> list[Path]:
    """The sockets mmctl tries, in order, when neither --socket nor $MMD_SOCKET names one:
    the user's own daemon, then the system service (which its group's members may use)."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return [Path(env)]
    own = runtime_dir() / "mmd.sock"
    return [own] if own == SYSTEM_SOCKET else [own, SYSTEM_SOCKET]


class UnsafeDirectory(Exception):
    """A directory another user could have made or could change: its sockets are not ours."""


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_private_dir(path: Path) -> None:
    """Raise UnsafeDirectory unless ``path`` is a real directory (not a symbolic link) owned
    by this user and writable by nobody else, as ssh-agent and tmux check theirs: a
    directory in /tmp may have been made first by another user, who could then put a
    socket of their own in mmd's place and read every prompt. FileNotFoundError when it
    does not exist."""
    info = os.lstat(path)
    why = ""
    if stat.S_ISLNK(info.st_mode):
        why = "it is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        why = "it is not a directory"
    elif info.st_uid != os.geteuid():
        why = f"it is owned by {user_name(info.st_uid)}, not by you ({user_name(os.geteuid())})"
    elif info.st_mode & 0o022:
        why = f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    if why:
        raise UnsafeDirectory(
            f"unsafe runtime directory {path}: {why}; remove it, or set XDG_RUNTIME_DIR"
        )


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


def model_log(log_dir: Path, model_id: str) -> Path:
    """The file a model's llama-server writes its output to, in the daemon's log_dir: the
    engine starts the child with it; `mmctl logs` and failure reports read it."""
    return log_dir / f"{model_id}.log"


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
