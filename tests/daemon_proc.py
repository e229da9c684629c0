"""A real mmd process in a directory of its own, with a config written there.

One implementation for the tests (tests/conftest.py's ``Daemon`` and ``make_daemon``)
and the benchmarks (bench/harness.py's ``Daemon``, which only sets longer timeouts).
It imports nothing from pytest, so that bench/ can import it by adding tests/ to
``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
import psutil

from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc


class DaemonFailed(AssertionError):
    """mmd exited at start, or did not serve in time (an AssertionError, so a test
    reads it as a failure rather than an error of its own)."""


def llama_children(marker: str) -> list[psutil.Process]:
    """llama-server processes whose command line mentions ``marker`` (a directory)."""
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


@dataclass
class Daemon:
    """A real mmd process in ``root``: its config is a ``[daemon]`` table (paths under
    ``root``, the timeouts below, then ``daemon_extra``) followed by ``config_text``."""

    root: Path
    config_text: str
    extra_env: dict[str, str] = field(default_factory=dict)
    daemon_extra: str = ""  # more lines for the [daemon] table
    load_timeout: str = "30s"  # unless daemon_extra sets its own
    stop_grace: str = "3s"
    drain_timeout: str = "5s"
    start_timeout: float = 30.0  # seconds until mmd must answer GetHealth
    poll_s: float = 0.05  # how often start() asks
    # A command mmd runs under, e.g. ("ip", "netns", "exec", NAME) for a node in a
    # network namespace; it must exec mmd (the process is mmd's, for signals).
    wrapper: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    start_ms: float = 0.0  # from spawning to the first GetHealth answer
    # [budget] cpus, unless the config sets it: one core, so each child computes on one
    # thread. Several threads of one child wait for each other at every step, and on a
    # machine that other work keeps busy a long answer then crawls and a test times out;
    # one thread never waits. None: mmd's own budget (the benchmarks, the cores tests).
    cpus: str | None = "1"

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
            stop_grace = "{self.stop_grace}"
            drain_timeout = "{self.drain_timeout}"
            """
        )
        if "load_timeout" not in self.daemon_extra:
            header += f'load_timeout = "{self.load_timeout}"\n'
        extra = textwrap.dedent(self.daemon_extra)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(header + extra + self._with_cpus(self.config_text))

    def _with_cpus(self, config_text: str) -> str:
        text = textwrap.dedent(config_text)
        if self.cpus is None or re.search(r"^\s*cpus\s*=", text, re.MULTILINE):
            return text
        setting = f"cpus = {self.cpus}\n"
        if re.search(r"^\s*\[budget\]\s*$", text, re.MULTILINE):
            return re.sub(
                r"^\s*\[budget\]\s*$\n?", f"[budget]\n{setting}", text, count=1, flags=re.MULTILINE
            )
        return f"{text}\n\n[budget]\n{setting}"

    def start(self, *extra_args: str, wait: bool = True) -> Self:
        self.write_config()
        began = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.wrapper,
                    sys.executable,
                    "-m",
                    "mmd",
                    "--config",
                    str(self.config_path),
                    *extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
            )
        if wait:
            self.wait_serving()
            self.start_ms = (time.perf_counter() - began) * 1000
        return self

    def wait_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DaemonFailed(f"mmd exited at start: {self.log_path.read_text()}")
            if self.socket.exists():
                try:
                    self.stub.GetHealth(pb.GetHealthRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
            time.sleep(self.poll_s)
        raise DaemonFailed(f"mmd did not serve in time: {self.log_path.read_text()}")

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

    def load_and_answer(self, model_id: str, tokens: int, timeout: float) -> None:
        """``mmctl load`` then a ``mmctl infer --json`` of ``tokens`` tokens, both must work:
        the proof that a runtime serves."""
        load = self.mmctl("load", model_id, timeout=timeout)
        assert load.returncode == 0, load.stderr.decode()
        result = self.mmctl(
            "infer", model_id, "hello", "--max-tokens", str(tokens), "--json", timeout=timeout
        )
        assert result.returncode == 0, result.stderr.decode()
        assert json.loads(result.stdout)["completion_tokens"] == tokens

    def load(self, model_id: str, timeout: float = 120) -> pb.Model:
        """LoadModel until ready; the loaded model."""
        model = None
        request = pb.LoadModelRequest(model_id=model_id)
        for progress in self.stub.LoadModel(request, timeout=timeout):
            if progress.HasField("model"):
                model = progress.model
        assert model is not None, f"no model in the load reply for {model_id}"
        return model

    def model(self, model_id: str) -> pb.Model:
        models = self.stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        return next(m for m in models if m.id == model_id)

    def health(self) -> pb.Health:
        return self.stub.GetHealth(pb.GetHealthRequest(), timeout=30)

    def rss_bytes(self) -> int:
        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def children(self) -> list[psutil.Process]:
        return llama_children(str(self.root))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal mmd and wait (SIGKILL after ``timeout``); its exit status."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
