"""Preload at start-up: preload and pinned models load without a request, in priority order,
within the budget; a preload that fails is logged and the daemon serves anyway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Daemon, wait_until

from mmd.v1 import mmd_pb2 as pb


def states(daemon: Daemon) -> dict[str, int]:
    return {m.id: m.state for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}


def test_preload_and_pinned_models_are_ready_without_a_request(
    make_daemon: Any, model_files: dict[str, Path]
) -> None:
    daemon: Daemon = make_daemon(
        f"""
        [models.pinned]
        path = "{model_files["tiny2"]}"
        ctx = 256
        priority = 0

        [models.pre]
        path = "{model_files["tiny"]}"
        ctx = 256
        preload = true

        [models.huge]
        path = "{model_files["tiny"]}"
        memory = "64TiB"
        preload = true

        [models.broken]
        path = "{model_files["tiny"]}"
        ctx = 256
        preload = true
        args = ["--no-such-option"]  # llama-server exits at once: a failed load

        [models.lazy]
        path = "{model_files["embed"]}"
        ctx = 256
        embedding = true
        """
    )
    ready = pb.MODEL_STATE_READY
    assert wait_until(
        lambda: states(daemon)["pinned"] == ready and states(daemon)["pre"] == ready, timeout=60
    )
    assert wait_until(lambda: "preload of broken failed" in daemon.log_path.read_text(), 30)
    log = daemon.log_path.read_text()
    assert "preload of huge refused" in log
    # Priority order, then id: the pinned model (priority 0) starts loading first.
    assert log.index("pinned: loading") < log.index("pre: loading")
    assert states(daemon)["huge"] == pb.MODEL_STATE_UNLOADED
    assert states(daemon)["broken"] == pb.MODEL_STATE_FAILED
    assert states(daemon)["lazy"] == pb.MODEL_STATE_UNLOADED
    # Serving regardless, and the preloaded children are the ones serving.
    pids = {m.id: m.pid for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}
    chunks = list(daemon.stub.Infer(pb.InferRequest(model_id="pre", prompt="x", max_tokens=2)))
    assert chunks[-1].done.completion_tokens == 2
    assert chunks[-1].done.timings.load_ms == 0
    assert {m.id: m.pid for m in daemon.stub.ListModels(pb.ListModelsRequest()).models} == pids
    assert len(daemon.children()) == 2
