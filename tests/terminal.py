"""A real terminal for CLI tests: a tmux server of their own (so nothing touches the user's
sessions) holding one session, and the fixture that starts and ends it."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest


class Tmux:
    """A tmux server of its own, with one session named ``session``."""

    def __init__(self, session: str) -> None:
        self.name = f"mmd-test-{uuid.uuid4().hex[:8]}"
        self.session = session

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.name, *args], capture_output=True, text=True, check=False
        )

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session).stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def alive(self) -> bool:
        return self.run("has-session", "-t", self.session).returncode == 0


def tmux_server(session: str) -> Iterator[Tmux]:
    """The body of a ``tmux`` fixture: skips without tmux, kills the server after."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    server = Tmux(session)
    yield server
    server.run("kill-server")
