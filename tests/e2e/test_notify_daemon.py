"""The real daemon speaking systemd's notify protocol to a datagram socket, and its shutdown
under load."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Daemon, wait_until

from mmd.v1 import mmd_pb2 as pb


class NotifyListener:
    """A datagram socket standing in for systemd: records (monotonic time, message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def assignments(self, key: str) -> list[tuple[float, str]]:
        """(time, value) of every ``KEY=value`` received, in order."""
        return [
            (at, line.split("=", 1)[1])
            for at, message in list(self.messages)
            for line in message.splitlines()
            if line.startswith(f"{key}=")
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    found = NotifyListener(tmp_path / "notify.sock")
    yield found
    found.close()


def notify_env(listener: NotifyListener) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"}


def start_notifying(make_daemon: Any, listener: NotifyListener, config: str) -> Daemon:
    """A daemon told to notify `listener`, started; returns once it said READY=1."""
    daemon: Daemon = make_daemon(config, start=False, extra_env=notify_env(listener))
    daemon.start(wait=False)
    assert wait_until(lambda: listener.assignments("READY"), timeout=30)
    return daemon


def test_ready_status_watchdog_and_stopping(
    make_daemon: Any, model_files: dict[str, Path], listener: NotifyListener
) -> None:
    daemon = start_notifying(
        make_daemon,
        listener,
        f"""
        [models.tiny]
        path = "{model_files["tiny"]}"
        ctx = 256
        preload = true

        [models.other]
        path = "{model_files["tiny2"]}"
        ctx = 256
        """,
    )
    # READY=1 means the socket serves: a call made now succeeds.
    assert daemon.stub.GetHealth(pb.GetHealthRequest(), timeout=5).version

    assert wait_until(
        lambda: "serving 2 models, 1 loaded" in [v for _, v in listener.assignments("STATUS")],
        timeout=30,
    )
    statuses = [value for _, value in listener.assignments("STATUS")]
    assert "preloading 1/1: tiny" in statuses
    assert statuses.index("preloading 1/1: tiny") < statuses.index("serving 2 models, 1 loaded")

    # WATCHDOG_USEC=400000: pings every 200 ms; at least 3 in a second, loosely.
    start = time.monotonic()
    time.sleep(1.0)
    pings = [at for at, _ in listener.assignments("WATCHDOG") if start <= at <= start + 1.0]
    assert len(pings) >= 3

    assert daemon.stop(signal.SIGTERM) == 0
    [(stopping_at, value)] = listener.assignments("STOPPING")
    assert value == "1"
    assert stopping_at > listener.assignments("READY")[0][0]


def test_sighup_reload_is_bracketed_by_reloading_and_ready(
    make_daemon: Any, model_files: dict[str, Path], listener: NotifyListener
) -> None:
    daemon = start_notifying(
        make_daemon, listener, f'[models.tiny]\npath = "{model_files["tiny"]}"\nctx = 256\n'
    )
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: len(listener.assignments("READY")) == 2, timeout=30)
    [(reloading_at, value)] = listener.assignments("RELOADING")
    assert value == "1"
    first_ready, second_ready = (at for at, _ in listener.assignments("READY"))
    assert first_ready < reloading_at <= second_ready
    [(_, usec)] = listener.assignments("MONOTONIC_USEC")
    assert abs(int(usec) / 1e6 - reloading_at) < 5.0  # both CLOCK_MONOTONIC
    assert daemon.stub.GetHealth(pb.GetHealthRequest(), timeout=5).version


def test_sigterm_under_load_accounts_for_every_request(
    make_daemon: Any, model_files: dict[str, Path], listener: NotifyListener
) -> None:
    daemon: Daemon = make_daemon(
        f"""
        [models.m40]
        path = "{model_files["m40"]}"
        ctx = 2048
        parallel = 4
        """,
        extra_env=notify_env(listener),
    )
    outcomes: dict[int, object] = {}
    started = threading.Event()

    def generate(index: int) -> None:
        request = pb.InferRequest(model_id="m40", prompt="go", max_tokens=300)
        try:
            chunks = []
            for chunk in daemon.stub.Infer(request):
                chunks.append(chunk)
                started.set()
            outcomes[index] = chunks[-1].done.completion_tokens
        except grpc.RpcError as err:
            outcomes[index] = err.code()

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    assert started.wait(60)
    assert daemon.process is not None
    began = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(60)
    stopped_in = time.monotonic() - began
    for thread in threads:
        thread.join(30)

    assert code == 0
    assert stopped_in < 30  # drain_timeout is 5 s here; the unit allows 90 s
    assert sorted(outcomes) == list(range(8))
    clear = {grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    for outcome in outcomes.values():
        assert outcome == 300 or outcome in clear, outcome
    assert [v for _, v in listener.assignments("STOPPING")] == ["1"]
    assert wait_until(lambda: not daemon.children(), timeout=5)
