"""mmctl whose reader goes away (`mmctl ... | head`): exit 141 (128 + SIGPIPE), no message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

SIGPIPE_STATUS = 141


def _registry(models: dict[str, Path]) -> str:
    return f'[models.a]\npath = "{models["tiny"]}"\nctx = 512\n'


def _into_a_closed_pipe(daemon: Daemon | None, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run mmctl with stdout on a pipe whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "mmctl", *args],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=daemon.env() if daemon is not None else None,
            timeout=90,
            check=False,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        # --raw: the synthetic model has no chat template, and asked for, raw needs no warning.
        ["infer", "a", "x", "--raw", "--max-tokens", "400"],
        ["ps"],
        ["models", "--json"],
        ["doctor"],
    ],
    ids=["infer", "ps", "models", "doctor"],
)
def test_a_closed_pipe_exits_141_quietly(
    make_daemon: Any, model_files: dict[str, Path], args: list[str]
) -> None:
    daemon: Daemon = make_daemon(_registry(model_files))
    if args[0] == "doctor":
        args = [*args, "--config", str(daemon.config_path)]
    result = _into_a_closed_pipe(daemon, *args)
    assert result.returncode == SIGPIPE_STATUS, result.stderr
    assert result.stderr == b""


@pytest.mark.parametrize("args", [["--help"], ["infer", "--help"], ["--version"]])
def test_help_into_a_closed_pipe_exits_141_quietly(args: list[str]) -> None:
    # Help is drawn by rich, which ends a broken pipe on its own terms (exit 1).
    result = _into_a_closed_pipe(None, *args)
    assert result.returncode == SIGPIPE_STATUS, result.stderr
    assert result.stderr == b""


def test_events_exit_141_once_the_reader_stops_reading(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(_registry(model_files))
    events = subprocess.Popen(
        [sys.executable, "-m", "mmctl", "events", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=daemon.env(),
    )
    assert events.stdout is not None
    assert events.stderr is not None
    assert events.stdout.readline()  # the snapshot: mmctl is streaming
    events.stdout.close()  # like `head -n 1` exiting
    assert events.wait(30) == SIGPIPE_STATUS
    assert events.stderr.read() == b""
