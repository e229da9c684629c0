"""The notify protocol against real datagram sockets standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmd.host.sdnotify import Notifier, run_watchdog


def _receive_all(sock: socket.socket) -> list[str]:
    messages: list[str] = []
    sock.setblocking(False)
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


@pytest.fixture
def manager_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and the $NOTIFY_SOCKET value that reaches it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_manager_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"mmd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_messages_arrive_exactly_as_sent(manager_socket: tuple[socket.socket, str]) -> None:
    sock, address = manager_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    notifier.ready()
    notifier.ready("serving 2 models")
    notifier.status("loading codellama")
    notifier.watchdog()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.stopping()
    notifier.stopping("draining 3 requests")
    notifier.close()
    received = [sock.recv(4096).decode() for _ in range(7)]
    reloading = received.pop(4)
    assert received == [
        "READY=1",
        "READY=1\nSTATUS=serving 2 models",
        "STATUS=loading codellama",
        "WATCHDOG=1",
        "STOPPING=1",
        "STOPPING=1\nSTATUS=draining 3 requests",
    ]
    first, stamp = reloading.split("\n")
    assert first == "RELOADING=1"
    key, _, usec = stamp.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_abstract_namespace(abstract_manager_socket: tuple[socket.socket, str]) -> None:
    sock, address = abstract_manager_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.ready("up")
    notifier.close()
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_status_newlines_stay_in_one_assignment(
    manager_socket: tuple[socket.socket, str],
) -> None:
    sock, address = manager_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.status("line one\nREADY=1")
    notifier.close()
    assert sock.recv(4096) == b"STATUS=line one READY=1"


def test_send_after_close_reopens(manager_socket: tuple[socket.socket, str]) -> None:
    sock, address = manager_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.status("a")
    notifier.close()
    notifier.status("b")
    notifier.close()
    assert [sock.recv(4096), sock.recv(4096)] == [b"STATUS=a", b"STATUS=b"]


def test_disabled_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    # Every call is a harmless no-op.
    notifier.ready("x")
    notifier.status("x")
    notifier.stopping()
    notifier.watchdog()
    notifier.close()


def test_reads_process_environment_by_default(
    manager_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = manager_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier()
    notifier.ready()
    notifier.close()
    assert sock.recv(4096) == b"READY=1"


def test_non_unix_address_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mmd.sdnotify"):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "not a Unix socket" in caplog.text


def test_vanished_socket_warns_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="mmd.sdnotify"):
        notifier.ready()
        notifier.status("still running")
        notifier.watchdog()
        notifier.stopping()
    notifier.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "notify socket" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **environ})
    assert notifier.watchdog_interval() == expected


async def test_run_watchdog_pings_until_stopped(
    manager_socket: tuple[socket.socket, str],
) -> None:
    sock, address = manager_socket
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    stop = asyncio.Event()
    task = asyncio.create_task(run_watchdog(notifier, stop))
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    pings = _receive_all(sock)
    # Every 0.1 s for 0.5 s is about 5; a loaded machine may manage fewer.
    assert len(pings) >= 2
    assert set(pings) == {"WATCHDOG=1"}
    # Stopped means stopped: nothing more arrives.
    await asyncio.sleep(0.3)
    assert _receive_all(sock) == []
    notifier.close()


async def test_run_watchdog_returns_at_once_without_watchdog(
    manager_socket: tuple[socket.socket, str],
) -> None:
    sock, address = manager_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    await asyncio.wait_for(run_watchdog(notifier, asyncio.Event()), timeout=5)
    assert _receive_all(sock) == []
