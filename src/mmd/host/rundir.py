"""The daemon's socket directory and its children's directory.

Whoever can write to the directory of a Unix socket can replace the socket and read every
prompt sent to it. So mmd creates what is missing with modes of its own choosing, changes
the mode of no directory it did not create (except its own runtime directory), and refuses
a directory another user could control instead of serving from it.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
from pathlib import Path

from mmd.core.errors import ConfigError
from mmd.host import paths

SOCKET_DIR_MODE = 0o750  # the owner and the group (mmctl's users) reach the socket
CHILDREN_DIR_MODE = 0o700  # llama-server's sockets: mmd alone
LOG_DIR_MODE = 0o750  # children's logs (0640): the owner writes, the group (mmctl logs) reads


def prepare_log_dir(directory: Path) -> None:
    """Create the children's log directory (``daemon.log_dir``) or check the one there;
    ConfigError, one line, when mmd could not write its children's logs in it. Called
    before anything else is created, so that a bad one leaves nothing behind."""
    name = f"log directory {directory} (daemon.log_dir)"
    try:
        directory.mkdir(mode=LOG_DIR_MODE, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{name} is not a directory") from None
    except OSError as err:
        raise ConfigError(f"cannot create {name}: {err.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} is not writable")


def check_dir_usable(directory: Path, name: str) -> None:
    """For ``mmd --check-config``, which creates nothing: ConfigError unless ``directory``
    is a directory this user can write in, or could be created (its nearest existing
    ancestor is one). ``name`` is how the message names it (as the daemon's start does)."""
    step = directory
    while not os.path.lexists(step):
        step = step.parent
    if step == directory:
        if not directory.is_dir():
            raise ConfigError(f"{name} is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"{name} is not writable")
        return
    if not step.is_dir():
        reason = os.strerror(errno.ENOTDIR)
    elif not os.access(step, os.W_OK | os.X_OK):
        reason = os.strerror(errno.EACCES)
    else:
        return
    raise ConfigError(f"cannot create {name}: {reason}")


def check_log_dir(directory: Path) -> None:
    """check_dir_usable for ``daemon.log_dir``, in prepare_log_dir's words."""
    check_dir_usable(directory, f"log directory {directory} (daemon.log_dir)")


def check_socket_dir(sock: Path) -> None:
    """check_dir_usable for the directory ``sock`` will be bound in, in
    prepare_socket_dir's words; the per-user /tmp/mmd-UID must be this user's alone."""
    directory = sock.parent
    if directory == paths.fallback_runtime_dir():
        try:
            paths.check_private_dir(directory)
        except FileNotFoundError:
            pass
        except paths.UnsafeDirectory as err:
            raise ConfigError(str(err)) from None
    check_dir_usable(directory, f"socket directory {directory}")


def prepare_socket_dir(sock: Path) -> None:
    """Create or check the directory ``sock`` will be bound in; ConfigError when unsafe."""
    directory = sock.parent
    if directory == paths.fallback_runtime_dir():
        _private_fallback_dir(directory)
        return
    try:
        created = _make_missing(directory)
        info = directory.stat()
    except OSError as err:
        raise ConfigError(f"cannot create socket directory {directory}: {err.strerror}") from None
    mode = stat.S_IMODE(info.st_mode)
    ours = info.st_uid == os.geteuid()
    if ours and mode & 0o007 and (created or directory == paths.runtime_dir()):
        # Access control is the filesystem: nobody outside the owner and group. Only for a
        # directory that is mmd's own: a shared one (a 1777 /tmp) must keep its mode.
        directory.chmod(mode & ~0o007)
    elif not created:
        _check_shared_dir(directory, info)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"socket directory {directory} is not writable")


def _make_missing(directory: Path) -> bool:
    """Create ``directory`` and its missing parents; whether mmd created ``directory``."""
    missing = []
    step = directory
    while not os.path.lexists(step):
        missing.append(step)
        step = step.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, SOCKET_DIR_MODE if path == directory else 0o755)
        except FileExistsError:
            if path == directory:
                return False  # made by someone else meanwhile: checked like any other
    return bool(missing)


def _check_shared_dir(directory: Path, info: os.stat_result) -> None:
    """Refuse a directory mmd did not create when another user could replace its socket."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o002 and not mode & stat.S_ISVTX:
        raise ConfigError(
            f"socket directory {directory} is writable by anyone (mode {mode:04o}) without "
            "the sticky bit: anyone could replace mmd's socket; use a directory of your own"
        )
    if info.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"socket directory {directory} is owned by {paths.user_name(info.st_uid)}, "
            "not by you or root: its owner could replace mmd's socket; "
            "use a directory of your own"
        )


def _private_fallback_dir(directory: Path) -> None:
    """/tmp/mmd-UID: made 0700 here, or refused when it is not this user's alone."""
    try:
        _mkdir_exact(directory, 0o700)
    except FileExistsError:
        pass  # checked below like one made by anyone else
    except OSError as err:
        raise ConfigError(f"cannot create runtime directory {directory}: {err.strerror}") from None
    try:
        paths.check_private_dir(directory)
    except paths.UnsafeDirectory as err:
        raise ConfigError(str(err)) from None


def fresh_children_dir(sock: Path) -> Path:
    """Make the daemon's own children's directory anew (call it holding the daemon's lock:
    what is in it was left by a daemon on this socket that is gone)."""
    children = paths.children_dir(sock)
    try:
        info = os.lstat(children)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigError(
                f"{children} is in the way of mmd's children's sockets and is not mmd's "
                "own directory; remove it"
            )
        shutil.rmtree(children)
    try:
        _mkdir_exact(children, CHILDREN_DIR_MODE)
    except FileExistsError:  # appeared since the lstat: not ours
        raise ConfigError(f"{children} appeared while mmd started; remove it") from None
    except OSError as err:
        raise ConfigError(f"cannot create {children}: {err.strerror}") from None
    return children


def _mkdir_exact(path: Path, mode: int) -> None:
    """mkdir, then the mode exactly (mkdir's is masked by the umask), set through a
    descriptor that cannot follow a symbolic link put in the directory's place meanwhile."""
    os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def remove_children_dir(sock: Path) -> None:
    """At shutdown, once every child has stopped."""
    shutil.rmtree(paths.children_dir(sock), ignore_errors=True)


class SocketInTheWay(Exception):
    """Something at a socket path mmd would bind that is not a dead socket of its own."""


def remove_dead_socket(path: Path) -> None:
    """A socket left by a daemon of this user's that died goes; a live one, or anything
    that is not a socket of this user's, is refused (SocketInTheWay) and never removed:
    it is not mmd's."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
        raise SocketInTheWay(f"{path} exists and is not a socket of this user's")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as err:
        raise SocketInTheWay(f"{path}: {err.strerror or err}") from None
    finally:
        probe.close()
    raise SocketInTheWay(f"{path} is in use by another process")
