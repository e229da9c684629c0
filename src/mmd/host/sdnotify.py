"""The systemd notify protocol (sd_notify(3)), spoken directly on $NOTIFY_SOCKET.

Each message is one datagram of newline-separated ``KEY=VALUE`` assignments sent to an
AF_UNIX SOCK_DGRAM socket; a path that starts with "@" names the abstract namespace.
Outside systemd (no $NOTIFY_SOCKET) every call is a no-op, so the daemon calls these
unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger("mmd.sdnotify")  # the name in the log, kept when the module moved

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

# A full receive queue on the manager's side must not freeze the event loop for long.
_SEND_TIMEOUT_S = 1.0


def _socket_address(value: str) -> str | None:
    """The address to send to, or None when $NOTIFY_SOCKET is not a Unix socket we speak to."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _one_line(text: str) -> str:
    # A newline inside a value would start a new assignment in the datagram.
    return " ".join(text.splitlines())


class Notifier:
    """systemd notify protocol; every method is a no-op when $NOTIFY_SOCKET is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get(NOTIFY_SOCKET_ENV, "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("ignoring %s=%r: not a Unix socket path", NOTIFY_SOCKET_ENV, raw)
        self._watchdog_usec = env.get(WATCHDOG_USEC_ENV, "")
        self._watchdog_pid = env.get(WATCHDOG_PID_ENV, "")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str = "") -> None:
        """Tell systemd start-up is finished (READY=1), with an optional status line."""
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        """A free-form status line shown by `systemctl status`."""
        self._send(f"STATUS={_one_line(text)}")

    def reloading(self) -> None:
        """Tell systemd a reload has begun (RELOADING=1 with its MONOTONIC_USEC); send
        READY=1 when it is over, whatever its outcome."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> None:
        """Tell systemd shutdown has begun (STOPPING=1)."""
        self._send("STOPPING=1", status)

    def watchdog(self) -> None:
        """One keep-alive ping (WATCHDOG=1)."""
        self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.

        None when the watchdog is off, unparsable, or meant for another process
        ($WATCHDOG_PID names a different pid).
        """
        if not self.enabled or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket; a later message opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, first: str, status: str = "") -> None:
        if self._address is None:
            return
        message = first if not status else f"{first}\nSTATUS={_one_line(status)}"
        try:
            with self._lock:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(_SEND_TIMEOUT_S)
                    self._sock = sock
                self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # The manager went away or restarted: the daemon itself must carry on.
            if not self._warned:
                self._warned = True
                log.warning("systemd notify socket unusable, status updates dropped: %s", exc)


async def run_watchdog(notifier: Notifier, stop: asyncio.Event) -> None:
    """Ping WATCHDOG=1 every watchdog_interval() from the event loop until stop is set.

    Pinging from the loop itself (not a thread) is the point: a stuck loop stops pinging
    and systemd restarts the service.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while not stop.is_set():
        notifier.watchdog()
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            continue
