"""Who can reach which socket: the directories mmd makes or refuses, the per-user fallback
directory, the system socket as mmctl's second choice, and permission errors as one line.

Some tests run mmd or mmctl as another, unprivileged user (a uid with no other files,
through setpriv) with a Python interpreter that user can run.
"""

from __future__ import annotations

import grp
import itertools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cli_fakeserver import FakeModelManager, serve
from conftest import Daemon
from typer.testing import CliRunner

import mmd
from mmctl.cli import app
from mmd.host import paths
from mmd.v1 import mmd_pb2

runner = CliRunner()

# Unused uids, one per test, so that each gets its own /tmp/mmd-UID.
_UIDS = itertools.count(52000 + os.getpid() % 4000 * 2)


def _one_line(stderr: str, prefix: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), stderr
    return lines[0]


@dataclass
class Stranger:
    """An unprivileged user with a home of its own and nothing else."""

    uid: int
    python: str
    home: Path

    @property
    def fallback(self) -> Path:
        return Path(f"/tmp/mmd-{self.uid}")

    def env(self, **extra: str) -> dict[str, str]:
        src = Path(mmd.__file__).parents[1]
        site = Path(grpc.__file__).parents[1]
        env = {
            "HOME": str(self.home),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{src}:{site}",
            "LC_ALL": "C.UTF-8",
        }
        env.update(extra)
        return env

    def argv(self, module: str, *args: str) -> list[str]:
        ids = [f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]
        return ["setpriv", *ids, self.python, "-m", module, *args]

    def run(
        self, module: str, *args: str, timeout: float = 90, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(module, *args),
            env=self.env(**env),
            cwd="/",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _python_for(uid: int) -> str | None:
    """A Python of the same minor version that ``uid`` may run (the venv's may sit under /root)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (str(Path(sys.executable).resolve()), f"/usr/bin/python{version}"):
        probe = Stranger(uid, candidate, Path("/"))
        try:
            if probe.run("mmctl", "--version").returncode == 0:
                return candidate
        except OSError:
            continue
    return None


@pytest.fixture
def stranger() -> Iterator[Stranger]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    uid = next(_UIDS)
    python = _python_for(uid)
    if python is None:
        pytest.skip("no Python interpreter (with mmd's packages) that another user can run")
    home = Path(tempfile.mkdtemp(prefix="mmd-home-"))
    os.chown(home, uid, uid)
    fallback = Path(f"/tmp/mmd-{uid}")
    _remove(fallback)
    try:
        yield Stranger(uid, python, home)
    finally:
        _remove(fallback)
        shutil.rmtree(home, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# --- 1: directories mmd did not create -----------------------------------------


def test_an_existing_sticky_shared_directory_keeps_its_mode(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon("", start=False)
    shared = daemon.socket.parent
    shared.mkdir()
    shared.chmod(0o1777)
    daemon.start()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert daemon.mmctl("ps").returncode == 0
    assert daemon.stop() == 0
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


@pytest.mark.parametrize(
    ("mode", "foreign_owner", "reason"),
    [(0o777, False, "writable by anyone"), (0o755, True, "is owned by uid")],
    ids=["world-writable", "another-owner"],
)
def test_an_unsafe_socket_directory_is_refused_and_left_alone(
    make_daemon: Any, mode: int, foreign_owner: bool, reason: str
) -> None:
    daemon: Daemon = make_daemon("", start=False)
    directory = daemon.socket.parent
    directory.mkdir()
    directory.chmod(mode)
    if foreign_owner:
        os.chown(directory, 54999, 54999)
    daemon.start(wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(60) == 2
    log = daemon.log_path.read_text()
    assert "Traceback" not in log
    line = log.splitlines()[-1]
    assert line.startswith(f"mmd: socket directory {directory}"), log
    assert reason in line
    assert stat.S_IMODE(directory.stat().st_mode) == mode
    assert not daemon.socket.exists()


# --- 2: the per-user fallback directory /tmp/mmd-UID ----------------------------


def _plant(kind: str, stranger: Stranger) -> None:
    fallback = stranger.fallback
    if kind == "symlink":
        target = stranger.home / "elsewhere"
        target.mkdir(mode=0o700)
        os.chown(target, stranger.uid, stranger.uid)
        fallback.symlink_to(target)
        return
    fallback.mkdir()
    fallback.chmod(0o777)
    if kind == "own-but-writable":
        os.chown(fallback, stranger.uid, stranger.uid)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("another-owner", "owned by root (uid 0)"),
        ("symlink", "symbolic link"),
        ("own-but-writable", "writable by group or others"),
    ],
)
def test_an_unsafe_fallback_directory_is_refused_by_mmd_and_mmctl(
    stranger: Stranger, kind: str, reason: str
) -> None:
    _plant(kind, stranger)
    started = stranger.run("mmd", timeout=30)
    assert started.returncode == 2, started.stderr
    line = _one_line(started.stderr.splitlines()[-1] + "\n", "mmd: ")
    assert f"unsafe runtime directory {stranger.fallback}" in line
    assert reason in line
    assert "Traceback" not in started.stderr
    for args in (["ps"], ["infer", "a", "MY PRIVATE PROMPT"]):
        used = stranger.run("mmctl", *args)
        assert used.returncode == 3, used.stderr
        line = _one_line(used.stderr, "mmctl: ")
        assert f"unsafe runtime directory {stranger.fallback}" in line
        assert reason in line


def test_mmctl_sends_nothing_to_a_socket_planted_in_the_fallback_directory(
    stranger: Stranger,
) -> None:
    # Another user made /tmp/mmd-UID first and serves a gRPC server as "mmd.sock".
    stranger.fallback.mkdir()
    stranger.fallback.chmod(0o777)
    fake = FakeModelManager()
    fake.models = [mmd_pb2.Model(id="a", state=mmd_pb2.MODEL_STATE_READY)]
    with serve(fake, stranger.fallback / "mmd.sock") as planted:
        planted.chmod(0o777)
        used = stranger.run("mmctl", "infer", "a", "MY PRIVATE PROMPT")
    assert used.returncode == 3, used.stderr
    assert "unsafe runtime directory" in _one_line(used.stderr, "mmctl: ")
    assert fake.requests == []


def test_the_fallback_directory_is_made_private_and_serves_its_user(stranger: Stranger) -> None:
    daemon = subprocess.Popen(
        stranger.argv("mmd"),
        env=stranger.env(),
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sock = stranger.fallback / "mmd.sock"
        deadline = time.monotonic() + 60
        while not sock.exists() and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), daemon.stderr.read() if daemon.poll() is not None else "no socket"
        info = os.lstat(stranger.fallback)
        assert stat.S_ISDIR(info.st_mode)
        assert info.st_uid == stranger.uid
        assert stat.S_IMODE(info.st_mode) == 0o700
        used = stranger.run("mmctl", "ps", "--json")
        assert used.returncode == 0, used.stderr
        assert used.stdout.strip() == "[]"
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


# --- 3: the system socket as mmctl's second choice --------------------------------


@pytest.fixture
def as_a_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """mmctl's view of a non-root user whose runtime directory is tmp_path/xdg."""
    monkeypatch.setattr(paths, "_is_root", lambda: False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.delenv(paths.SOCKET_ENV, raising=False)
    (tmp_path / "xdg").mkdir(mode=0o700)
    return tmp_path / "xdg" / "mmd" / "mmd.sock"


def test_mmctl_uses_the_system_socket_when_the_users_own_is_absent(
    as_a_user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeModelManager()
    fake.models = [mmd_pb2.Model(id="sys", state=mmd_pb2.MODEL_STATE_READY, pid=7)]
    with serve(fake) as system:
        monkeypatch.setattr(paths, "SYSTEM_SOCKET", system)
        assert paths.socket_candidates() == [as_a_user, system]
        result = runner.invoke(app, ["ps", "--json"])
    assert result.exit_code == 0, result.output
    assert '"id": "sys"' in result.stdout


def test_mmctl_prefers_the_users_own_socket(
    as_a_user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own, system = FakeModelManager(), FakeModelManager()
    own.models = [mmd_pb2.Model(id="own", state=mmd_pb2.MODEL_STATE_READY, pid=7)]
    as_a_user.parent.mkdir(mode=0o700)
    with serve(own, as_a_user), serve(system) as system_socket:
        monkeypatch.setattr(paths, "SYSTEM_SOCKET", system_socket)
        result = runner.invoke(app, ["ps", "--json"])
    assert result.exit_code == 0, result.output
    assert '"id": "own"' in result.stdout
    assert system.requests == []


def test_unreachable_names_every_socket_tried(
    as_a_user: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    system = tmp_path / "system" / "mmd.sock"
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", system)
    result = runner.invoke(app, ["health"])
    assert result.exit_code == 3
    line = _one_line(result.stderr, "mmctl: ")
    assert f"no mmd daemon at {as_a_user} or {system}" in line


def test_an_explicit_socket_is_the_only_one_tried(
    as_a_user: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeModelManager()
    with serve(fake) as system:
        monkeypatch.setattr(paths, "SYSTEM_SOCKET", system)
        result = runner.invoke(app, ["--socket", str(tmp_path / "given.sock"), "ps"])
    assert result.exit_code == 3
    assert str(system) not in result.stderr
    assert fake.requests == []


# --- 7: permission denied is one line, exit 3 -------------------------------------


def _group_of(path: Path) -> str:
    return grp.getgrgid(path.stat().st_gid).gr_name


@pytest.mark.parametrize("where", ["unsearchable-directory", "socket-0660"])
@pytest.mark.parametrize("how", ["--socket", "MMD_SOCKET"])
def test_permission_denied_on_the_socket_is_one_line_and_exit_3(
    stranger: Stranger, where: str, how: str
) -> None:
    fake = FakeModelManager()
    with serve(fake) as sock:
        if where == "socket-0660":
            sock.parent.chmod(0o755)
            sock.chmod(0o660)
            group = _group_of(sock)
        else:
            group = _group_of(sock.parent)  # the directory (0700) is what keeps us out
        for command in (["ps"], ["health"], ["infer", "a", "hi"]):
            if how == "--socket":
                used = stranger.run("mmctl", "--socket", str(sock), *command)
            else:
                used = stranger.run("mmctl", *command, MMD_SOCKET=str(sock))
            assert used.returncode == 3, used.stderr
            line = _one_line(used.stderr, "mmctl: ")
            assert line == f"mmctl: permission denied on {sock} (are you in group {group}?)"
        doctor = stranger.run("mmctl", "doctor", "--json", MMD_SOCKET=str(sock))
    assert "Traceback" not in doctor.stderr
    assert doctor.returncode == 1, doctor.stderr
    assert f"permission denied on {sock} (are you in group {group}?)" in doctor.stdout
    assert fake.requests == []
