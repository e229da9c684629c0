"""mmd's log: its own messages at --log-level; the libraries' debug chatter only at trace."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from conftest import Daemon

from mmd.v1 import mmd_pb2 as pb

LINE = re.compile(r"^(TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): ")


def loggers_seen(daemon: Daemon) -> dict[str, set[str]]:
    """Logger name -> the levels it wrote, from the daemon's stderr."""
    seen: dict[str, set[str]] = {}
    for line in daemon.log_path.read_text().splitlines():
        match = LINE.match(line)
        if match:
            seen.setdefault(match.group(2), set()).add(match.group(1))
    return seen


def run_a_while(make_daemon: Any, model: Path, level: str) -> Daemon:
    daemon: Daemon = make_daemon(f'[models.a]\npath = "{model}"\nctx = 256\n', "--log-level", level)
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id="a", prompt="hi", max_tokens=4)))
    assert chunks[-1].WhichOneof("kind") == "done"
    time.sleep(1.0)  # a second of health polls and memory samples
    daemon.stop()
    return daemon


def test_debug_is_mmds_own_messages_only(make_daemon: Any, model_files: dict[str, Path]) -> None:
    daemon = run_a_while(make_daemon, model_files["tiny"], "debug")
    seen = loggers_seen(daemon)
    # Outside systemd too, the children's logs are not for others: 0640 in a 0750 directory.
    assert (daemon.root / "logs").stat().st_mode & 0o777 == 0o750
    assert (daemon.root / "logs" / "a.log").stat().st_mode & 0o777 == 0o640
    assert seen, "the daemon logged nothing"
    libraries = {name for name in seen if name != "mmd" and not name.startswith("mmd.")}
    chatty = {name for name in libraries if seen[name] & {"DEBUG", "INFO"}}
    assert not chatty, f"library loggers below WARNING at --log-level debug: {chatty}"


def test_trace_lets_the_libraries_speak(make_daemon: Any, model_files: dict[str, Path]) -> None:
    seen = loggers_seen(run_a_while(make_daemon, model_files["tiny"], "trace"))
    libraries = {name for name in seen if name != "mmd" and not name.startswith("mmd.")}
    chatty = {name for name in libraries if seen[name] & {"DEBUG", "INFO"}}
    assert chatty, sorted(seen)  # grpc, asyncio, ...
