"""Placement and eviction with real children: a RAM budget that holds two of three models."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from conftest import Daemon

from mmd.core.units import MIB
from mmd.v1 import mmd_pb2 as pb

# Estimates: a (m40, ctx 512) ~76 MiB, b (m50, ctx 2048) ~120 MiB, c (m60, ctx 512) ~114 MiB.
# Any two fit, three do not.
BUDGET = 250 * MIB
CTX = {"a": 512, "b": 2048, "c": 512}


def config(models: dict[str, Path], priorities: dict[str, int] | None = None) -> str:
    priorities = priorities or {}
    text = f"""
    [budget]
    ram = "{BUDGET}"
    """
    for model_id, name in (("a", "m40"), ("b", "m50"), ("c", "m60")):
        text += f"""
    [models.{model_id}]
    path = "{models[name]}"
    ctx = {CTX[model_id]}
    priority = {priorities.get(model_id, 1)}
    """
    return text


def states(daemon: Daemon) -> dict[str, str]:
    models = json.loads(daemon.mmctl("models", "--json").stdout)
    return {m["id"]: m["state"] for m in models}


def infer(daemon: Daemon, model_id: str, tokens: int = 4) -> pb.InferDone:
    chunks = list(
        daemon.stub.Infer(pb.InferRequest(model_id=model_id, prompt="go", max_tokens=tokens))
    )
    assert chunks[-1].WhichOneof("kind") == "done"
    return chunks[-1].done


class RssSampler:
    """Samples the summed RSS of a daemon's children until stopped."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in self.daemon.children():
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def sampled(make_daemon: Any, model_files: dict[str, Path]) -> Iterator[tuple[Daemon, RssSampler]]:
    daemon: Daemon = make_daemon(config(model_files))
    with RssSampler(daemon) as sampler:
        yield daemon, sampler
    assert sampler.samples > 10
    assert sampler.peak <= BUDGET, f"children held {sampler.peak} > budget {BUDGET}"


def test_third_model_evicts_the_least_recently_used(sampled: tuple[Daemon, RssSampler]) -> None:
    daemon, _ = sampled
    infer(daemon, "a")
    infer(daemon, "b")
    infer(daemon, "a")  # b is now the least recently used
    plan = json.loads(daemon.mmctl("plan", "c", "--json").stdout)
    assert plan["feasible"] is True
    assert plan["evict"] == ["b"]
    assert states(daemon) == {"a": "ready", "b": "ready", "c": "unloaded"}
    infer(daemon, "c")
    assert states(daemon) == {"a": "ready", "b": "unloaded", "c": "ready"}
    assert len(daemon.children()) == 2


def test_ps_and_health_expose_budget_estimate_measurement(
    sampled: tuple[Daemon, RssSampler],
) -> None:
    daemon, _ = sampled
    infer(daemon, "a")
    ps = json.loads(daemon.mmctl("ps", "--json").stdout)
    (model,) = ps
    assert model["id"] == "a"
    assert model["estimated_bytes"] > 0
    assert model["placement"]["shares"][0]["device"] == "ram"
    health = json.loads(daemon.mmctl("health", "--json").stdout)
    (ram,) = [d for d in health["devices"] if d["id"] == "ram"]
    assert ram["budget_bytes"] <= BUDGET
    assert ram["free_bytes"] > 0
    assert ram["total_bytes"] > ram["free_bytes"]
    # The measurement arrives within a sampling period after ready.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        measured = json.loads(daemon.mmctl("ps", "--json").stdout)[0]["measured_bytes"]
        if measured:
            break
        time.sleep(0.2)
    assert 0.3 * model["estimated_bytes"] < measured < 2 * model["estimated_bytes"]


def test_pinned_model_survives(make_daemon: Any, model_files: dict[str, Path]) -> None:
    daemon: Daemon = make_daemon(config(model_files, {"a": 0}))
    infer(daemon, "a")
    infer(daemon, "b")  # a (pinned) is the least recently used
    infer(daemon, "c")
    assert states(daemon) == {"a": "ready", "b": "unloaded", "c": "ready"}


def test_busy_model_is_not_evicted_and_the_load_waits(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(config(model_files, {"a": 0}))
    infer(daemon, "a")
    infer(daemon, "b")
    with ThreadPoolExecutor(2) as pool:
        # ~1500 tokens on m50 keep b busy for several seconds.
        long_run = pool.submit(infer, daemon, "b", 1500)
        deadline = time.monotonic() + 10
        while json.loads(daemon.mmctl("health", "--json").stdout)["active_inferences"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = pool.submit(infer, daemon, "c")
        time.sleep(0.5)
        assert states(daemon)["b"] == "ready"  # busy: not evicted
        assert not waiting.done()  # c waits for room
        done = long_run.result(timeout=120)
        assert done.completion_tokens == 1500  # the busy request was never cut short
        assert waiting.result(timeout=60).completion_tokens == 4
    assert states(daemon) == {"a": "ready", "b": "unloaded", "c": "ready"}


def test_refused_with_numbers_when_pinned_models_hold_the_room(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(config(model_files, {"a": 0, "b": 0}))
    infer(daemon, "a")
    infer(daemon, "b")
    result = daemon.mmctl("infer", "c", "hello")
    assert result.returncode == 5
    message = result.stderr.decode()
    assert message.count("\n") == 1
    assert "MiB" in message
    assert "pinned" in message
    assert "a" in message
    assert "b" in message
    assert states(daemon) == {"a": "ready", "b": "ready", "c": "unloaded"}


def test_model_larger_than_the_budget_is_refused_before_evicting(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        config(model_files) + f'\n[models.huge]\npath = "{model_files["m60"]}"\nmemory = "1GiB"\n'
    )
    infer(daemon, "a")
    with pytest.raises(grpc.RpcError) as err:
        infer(daemon, "huge")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1.0 GiB" in (err.value.details() or "")
    assert states(daemon)["a"] == "ready"  # nothing was evicted for it
    plan = daemon.mmctl("plan", "huge", "--json")
    assert plan.returncode == 5
    assert json.loads(plan.stdout)["feasible"] is False
