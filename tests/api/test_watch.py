"""Watch and Logs against a real daemon with real llama-server children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from conftest import Daemon, wait_until
from watching import Watcher, is_subsequence, summary

from mmd.core.units import MIB
from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc

# a (~76 MiB) and b (~120 MiB) each fit, not both: loading b evicts an idle a.
EVICTION_CONFIG = """
[budget]
ram = "{budget}"

[models.a]
path = "{a}"
ctx = 512

[models.b]
path = "{b}"
ctx = 2048
"""


def infer(daemon: Daemon, model_id: str, tokens: int = 4) -> None:
    chunks = list(
        daemon.stub.Infer(pb.InferRequest(model_id=model_id, prompt="go", max_tokens=tokens))
    )
    assert chunks[-1].WhichOneof("kind") == "done"


def test_watch_sees_load_infer_evict_crash(make_daemon: Any, model_files: dict[str, Path]) -> None:
    daemon: Daemon = make_daemon(
        EVICTION_CONFIG.format(budget=150 * MIB, a=model_files["m40"], b=model_files["m50"])
    )
    watcher = Watcher(daemon)
    try:
        assert wait_until(lambda: len(watcher.events) >= 1)
        infer(daemon, "a")
        infer(daemon, "b")
        (model,) = json.loads(daemon.mmctl("ps", "--json").stdout)
        assert model["id"] == "b"
        os.kill(model["pid"], signal.SIGKILL)
        assert wait_until(
            lambda: any(m.state == pb.MODEL_STATE_FAILED for m in watcher.kinds("model")),
            timeout=20,
        )
        assert wait_until(lambda: bool(watcher.kinds("memory")), timeout=20)
    finally:
        watcher.close()

    events = list(watcher.events)
    assert events[0].WhichOneof("kind") == "snapshot"
    assert events[0].snapshot.version
    assert [d.id for d in events[0].snapshot.devices] == ["ram"]
    seen = [summary(e) for e in events]
    expected = [
        ("model", "a", "MODEL_STATE_LOADING", "load", ""),
        ("model", "a", "MODEL_STATE_READY", "load", ""),
        ("request", "a", "ok"),
        ("model", "a", "MODEL_STATE_UNLOADING", "evicted", "b"),
        ("model", "a", "MODEL_STATE_UNLOADED", "evicted", "b"),
        ("model", "b", "MODEL_STATE_LOADING", "load", ""),
        ("model", "b", "MODEL_STATE_READY", "load", ""),
        ("request", "b", "ok"),
        ("model", "b", "MODEL_STATE_FAILED", "crashed", ""),
    ]
    assert is_subsequence(expected, seen), seen
    (crash,) = [m for m in watcher.kinds("model") if m.reason == "crashed"]
    assert "SIGKILL" in crash.detail
    assert crash.model.id == "b"
    ready_a = next(m for m in watcher.kinds("model") if m.state == pb.MODEL_STATE_READY)
    assert ready_a.model.pid > 0
    request_a = next(r for r in watcher.kinds("request") if r.model_id == "a")
    assert request_a.kind == "infer"
    assert request_a.completion_tokens == 4
    assert request_a.total_ms >= request_a.first_token_ms >= request_a.queue_ms > 0
    assert request_a.tokens_per_second > 0
    sample = watcher.kinds("memory")[0]
    assert sample.devices[0].id == "ram"
    assert sample.devices[0].total_bytes > 0


def daemon_rss(daemon: Daemon) -> int:
    assert daemon.process is not None
    return psutil.Process(daemon.process.pid).memory_info().rss


def test_slow_watcher_is_told_it_lagged_and_memory_stays_bounded(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(f'[models.t]\npath = "{model_files["tiny"]}"\nparallel = 2\n')
    infer(daemon, "t")
    # A separate connection with a fixed small flow-control window: once it is full the
    # daemon cannot hand the watcher more, and its bounded buffer has to overflow.
    channel = grpc.insecure_channel(f"unix:{daemon.socket}", options=[("grpc.http2.bdp_probe", 0)])
    stalled = mmd_pb2_grpc.ModelManagerStub(channel).Watch(pb.WatchRequest())
    assert next(stalled).WhichOneof("kind") == "snapshot"
    before = daemon_rss(daemon)

    def refused(_: int) -> None:
        # An embedding request to a generation model is refused at once, yet it is a
        # finished request all the same: a cheap way to publish many events.
        with pytest.raises(grpc.RpcError) as err:
            daemon.stub.Embed(pb.EmbedRequest(model_id="t", input=["x"]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    sent = 3000
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(refused, range(sent)))
    grown = daemon_rss(daemon) - before

    received: list[pb.Event] = []
    for event in stalled:
        received.append(event)
        if event.WhichOneof("kind") == "lagged":
            received.append(next(stalled))
            break
        assert len(received) <= sent
    stalled.cancel()
    channel.close()

    assert received[-2].WhichOneof("kind") == "lagged"
    assert received[-1].WhichOneof("kind") == "snapshot"
    dropped = received[-2].lagged.dropped
    delivered = sum(1 for e in received if e.WhichOneof("kind") == "request")
    assert delivered < sent
    # Nothing vanished silently: each request was delivered or counted as dropped
    # (the count also holds memory samples).
    assert delivered + dropped >= sent
    assert grown < 30 * MIB, f"the daemon's RSS grew by {grown / MIB:.1f} MiB"


def test_logs_tail_follow_and_unknown_model(make_daemon: Any, model_files: dict[str, Path]) -> None:
    daemon: Daemon = make_daemon(f'[models.t]\npath = "{model_files["tiny"]}"\n')
    with pytest.raises(grpc.RpcError) as err:
        list(daemon.stub.Logs(pb.LogsRequest(model_id="nope")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert daemon.mmctl("logs", "nope").returncode == 4

    # Never loaded: no log to show, said in one line (it printed nothing and exited 0).
    never = daemon.mmctl("logs", "t")
    assert never.returncode == 1
    assert never.stdout == b""
    assert never.stderr.decode().splitlines() == [
        f"mmctl: model 't' has no log yet: it has not been loaded "
        f"(its llama-server log will be {daemon.root / 'logs' / 't.log'})"
    ]

    infer(daemon, "t")
    result = daemon.mmctl("logs", "t", "-n", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 5
    log_lines = (daemon.root / "logs" / "t.log").read_text().splitlines()
    assert lines == log_lines[-5:]

    follow = daemon.stub.Logs(pb.LogsRequest(model_id="t", lines=1, follow=True))
    assert len(next(follow).lines) == 1
    infer(daemon, "t")  # llama-server logs each request
    new = next(follow)
    follow.cancel()
    assert new.lines
    assert all(line in (daemon.root / "logs" / "t.log").read_text() for line in new.lines)


@pytest.fixture
def events_process(make_daemon: Any, model_files: dict[str, Path]) -> Iterator[tuple[Daemon, Any]]:
    daemon: Daemon = make_daemon(f'[models.t]\npath = "{model_files["tiny"]}"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "mmctl", "events", "--json", "--no-memory"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=daemon.env(),
    )
    yield daemon, process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_mmctl_events_json_lines(events_process: tuple[Daemon, Any]) -> None:
    daemon, process = events_process
    assert process.stdout is not None
    first = json.loads(process.stdout.readline())
    assert first["type"] == "snapshot"
    assert first["time"] > 0
    infer(daemon, "t")
    seen: list[dict[str, Any]] = []
    while not any(e["type"] == "request" for e in seen):
        seen.append(json.loads(process.stdout.readline()))
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 130
    assert {e["type"] for e in seen} <= {"model", "request"}
    ready = [e for e in seen if e["type"] == "model" and e["state"] == "ready"]
    assert ready[0]["model_id"] == "t"
    assert ready[0]["reason"] == "load"
    assert ready[0]["model"]["pid"] > 0
    (request,) = [e for e in seen if e["type"] == "request"]
    assert request["model_id"] == "t"
    assert request["status"] == "ok"
    assert request["completion_tokens"] == 4
