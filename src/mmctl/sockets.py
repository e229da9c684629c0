"""Which daemon socket mmctl uses, and the one-line errors for a socket it cannot use.

Imports nothing but the standard library and mmd.host.paths: the quick commands
(mmctl.quick) load it without grpc.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

from mmctl.errors import EXIT_UNREACHABLE, CliError
from mmd.host import paths


def unreachable_message(*tried: Path) -> str:
    where = " or ".join(str(path) for path in tried)
    return (
        f"no mmd daemon at {where} (start it with 'mmd' or 'systemctl start mmd', or pass --socket)"
    )


def permission_message(socket_path: Path) -> str:
    return f"permission denied on {socket_path} (are you in group {_group_of(socket_path)}?)"


def _group_of(socket_path: Path) -> str:
    """The group that grants access: the socket's, else its directory's (when the directory
    is what keeps us out); "mmd", the system service's group, when neither can be read."""
    for path in (socket_path, socket_path.parent):
        try:
            gid = os.stat(path).st_gid
        except OSError:
            continue
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return "mmd"


def locate_socket(candidates: list[Path]) -> Path | None:
    """The first candidate that exists, or that we may not even look at (its directory is
    closed to us, and the daemon may well be there); None when none does."""
    for candidate in candidates:
        try:
            os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            pass
        return candidate
    return None


def check_runtime_dir(socket_path: Path) -> None:
    """CliError (exit 3) when the socket lies in the per-user /tmp/mmd-UID and that is not
    this user's alone: whoever made it could serve a socket of their own there."""
    if socket_path.parent != paths.fallback_runtime_dir():
        return
    try:
        paths.check_private_dir(socket_path.parent)
    except FileNotFoundError:
        pass
    except paths.UnsafeDirectory as err:
        raise CliError(str(err), EXIT_UNREACHABLE) from None


def choose_socket(candidates: list[Path]) -> Path:
    """The socket to connect to, or CliError (exit 3) saying why there is none to use."""
    absolute = [Path(os.path.abspath(candidate)) for candidate in candidates]
    for candidate in absolute:
        check_runtime_dir(candidate)
    found = locate_socket(absolute)
    if found is None:
        raise CliError(unreachable_message(*absolute), EXIT_UNREACHABLE)
    try:
        os.stat(found)
    except OSError as err:
        if isinstance(err, PermissionError):
            raise CliError(permission_message(found), EXIT_UNREACHABLE) from None
        raise CliError(f"cannot use {found}: {err.strerror}", EXIT_UNREACHABLE) from None
    if not os.access(found, os.R_OK | os.W_OK):
        raise CliError(permission_message(found), EXIT_UNREACHABLE)
    return found
