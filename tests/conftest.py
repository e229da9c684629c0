"""Fixtures that run the real daemon with real llama-server children on synthetic models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest

from mmd.synthetic import write_model
from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc

START_TIMEOUT_S = 30.0


@pytest.fixture(autouse=True)
def cpu_only_unless_gpu_marked(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests mean CPU placement unless marked ``gpu``: on a machine with NVIDIA GPUs they
    are hidden from mmd (and CUDA children) the documented way, CUDA_VISIBLE_DEVICES=""."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic models shared by the session: tiny ones and three of ~40-60 MB."""
    base = tmp_path_factory.mktemp("models")
    return {
        "tiny": write_model(base / "tiny.gguf"),
        "tiny2": write_model(base / "tiny2.gguf", seed=1),
        "embed": write_model(base / "embed.gguf", embedding=128, seed=2),
        "m40": write_model(base / "m40.gguf", embedding=512, blocks=4, heads=8, seed=3),
        "m50": write_model(base / "m50.gguf", embedding=512, blocks=6, heads=8, seed=4),
        "m60": write_model(base / "m60.gguf", embedding=512, blocks=8, heads=8, seed=5),
    }


def llama_children(marker: str) -> list[psutil.Process]:
    """llama-server processes whose command line mentions ``marker`` (a test's tmp dir)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "llama-server" in cmdline and marker in cmdline and proc.pid != os.getpid():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                continue
    return found


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


@dataclass
class Daemon:
    """A real mmd process in a temporary directory."""

    root: Path
    config_text: str
    extra_env: dict[str, str] = field(default_factory=dict)
    daemon_extra: str = ""  # more lines for the [daemon] table
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None

    @property
    def socket(self) -> Path:
        return self.root / "run" / "mmd.sock"

    @property
    def config_path(self) -> Path:
        return self.root / "mmd.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MMD_CONFIG", None)
        env["MMD_SOCKET"] = str(self.socket)
        env.update(self.extra_env)
        return env

    def write_config(self) -> None:
        header = textwrap.dedent(
            f"""
            [daemon]
            socket = "{self.socket}"
            log_dir = "{self.root / "logs"}"
            state_dir = "{self.root / "state"}"
            stop_grace = "3s"
            drain_timeout = "5s"
            """
        )
        if "load_timeout" not in self.daemon_extra:
            header += 'load_timeout = "30s"\n'

        extra = textwrap.dedent(self.daemon_extra)
        self.config_path.write_text(header + extra + textwrap.dedent(self.config_text))

    def start(self, *extra_args: str, wait: bool = True) -> Daemon:
        self.write_config()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mmd", "--config", str(self.config_path), *extra_args],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env=self.env(),
        )
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"mmd exited at start: {self.log_path.read_text()}")
            if self.socket.exists():
                try:
                    self.stub.GetHealth(pb.GetHealthRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"mmd did not serve in time: {self.log_path.read_text()}")

    @property
    def stub(self) -> mmd_pb2_grpc.ModelManagerStub:
        if self.channel is None:
            self.channel = grpc.insecure_channel(f"unix:{self.socket}")
        return mmd_pb2_grpc.ModelManagerStub(self.channel)

    def mmctl(
        self, *args: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "mmctl", *args],
            input=input if input is not None else b"",
            capture_output=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )

    def children(self) -> list[psutil.Process]:
        return llama_children(str(self.root))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[object]:
    """Factory: make_daemon(config_text) -> a started Daemon; all are stopped after the test,
    and the test fails if any llama-server child outlives its daemon."""
    started: list[Daemon] = []

    def factory(config_text: str, *args: str, start: bool = True, **kw: object) -> Daemon:
        root = tmp_path / f"d{len(started)}"
        root.mkdir()
        daemon = Daemon(root, config_text, **kw)  # type: ignore[arg-type]
        started.append(daemon)
        if start:
            daemon.start(*args)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop()
    leftovers = llama_children(str(tmp_path))
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"llama-server children survived their daemon: {leftovers}"
