"""Requests that a shutdown cuts off end as ABORTED with mmd's error kind (mmctl: exit 1),
never as an unreachable daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from conftest import Daemon

from mmd.core.errors import ERROR_KIND_KEY
from mmd.v1 import mmd_pb2 as pb


def start_with_short_drain(make_daemon: Any, model: Path) -> Daemon:
    """A daemon whose drain (0.5 s) ends long before a 4,000-token answer does."""
    daemon: Daemon = make_daemon(f'[models.m]\npath = "{model}"\nctx = 4096\n', start=False)
    daemon.write_config()
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace('drain_timeout = "5s"', 'drain_timeout = "0.5s"'))
    daemon.write_config = lambda: None  # type: ignore[method-assign]
    return daemon.start()


def kind_of(err: grpc.RpcError) -> str | None:
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == ERROR_KIND_KEY:
            return str(value)
    return None


def test_a_request_cut_off_by_shutdown_is_aborted(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon = start_with_short_drain(make_daemon, model_files["m50"])
    outcome: dict[str, Any] = {}
    started = threading.Event()

    def generate() -> None:
        request = pb.InferRequest(model_id="m", prompt="go", max_tokens=4000)
        try:
            for _ in daemon.stub.Infer(request, timeout=60):
                started.set()
            outcome["finished"] = True
        except grpc.RpcError as err:
            outcome["error"] = err

    thread = threading.Thread(target=generate)
    thread.start()
    assert started.wait(60)
    assert daemon.process is not None
    began = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    thread.join(30)
    ended_in = time.monotonic() - began
    assert daemon.process.wait(30) == 0
    err = outcome["error"]
    assert (err.code(), err.details(), kind_of(err)) == (
        grpc.StatusCode.ABORTED,
        "mmd is shutting down",
        "aborted",
    )
    assert ended_in < 0.5 + 2.0  # the drain, not the children's stop_grace (3 s) on top


def test_mmctl_infer_cut_off_by_shutdown_exits_1(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon = start_with_short_drain(make_daemon, model_files["m50"])
    infer = subprocess.Popen(
        # --raw: the synthetic model has no chat template; asked for, raw needs no warning.
        [sys.executable, "-m", "mmctl", "infer", "m", "go", "--raw", "--max-tokens", "4000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=daemon.env(),
    )
    assert infer.stdout is not None
    first = infer.stdout.read(1)  # the answer has begun
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    out, err = infer.communicate(timeout=60)
    assert infer.returncode == 1
    assert err.decode().splitlines() == ["mmctl: mmd is shutting down"]
    assert first  # the partial text was printed, and ends its line before the error
    assert out.endswith(b"\n")
